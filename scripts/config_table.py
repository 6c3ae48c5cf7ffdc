#!/usr/bin/env python3
"""Print the README's configuration table from the one declaration in `qvl.supervisor.config`;
with `--write`, replace the table in README.md."""

import dataclasses
import re
import sys
from pathlib import Path

from qvl.supervisor.config import Config


def table() -> str:
    rows = ["| setting (TOML key) | flag | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{f.default}` | {f.metadata['help']} |"
             for f in dataclasses.fields(Config)]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        text = re.sub(r"\| setting \(TOML key\).*?\n(?!\|)", lambda _: table(), readme.read_text(),
                      count=1, flags=re.S)
        readme.write_text(text)
    else:
        print(table(), end="")
