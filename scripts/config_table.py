#!/usr/bin/env python3
"""Print the README's configuration table from the one declaration in `qvl.supervisor.config`."""

import dataclasses

from qvl.supervisor.config import Config

print("| setting (TOML key) | flag | default | meaning |")
print("| --- | --- | --- | --- |")
for f in dataclasses.fields(Config):
    print(f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{f.default}` | {f.metadata['help']} |")
