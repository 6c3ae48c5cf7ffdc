"""The two parsers of the launcher's socket pair, over any bytes and any JSON: the launcher reads a
launch as string arguments and a string environment or refuses it with `ValueError`; the
supervisor reads a launcher's line as a map or as nothing. Neither raises anything else."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvl.supervisor.launcher import said
from qvl.worker.launcher import read_launch

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20)
LINES = st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()) \
    | st.fixed_dictionaries({"args": JSON, "env": JSON}).map(lambda v: json.dumps(v).encode())


@given(LINES)
def test_a_launch_line_is_strings_or_refused(line):
    try:
        args, env = read_launch(line)
    except ValueError:
        return
    assert all(isinstance(a, str) for a in args)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())


@given(LINES)
def test_a_launchers_line_is_a_map_or_nothing(line):
    assert isinstance(said(line), dict)


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b'{"args": ' + b"[" * 100_000])
def test_deeply_nested_lines_are_refused_not_raised(line):
    with pytest.raises(ValueError):
        read_launch(line)
    assert said(line) == {}


def test_a_good_launch_reads_back():
    line = json.dumps({"args": ["--spare", "{}"], "env": {"A": "1"}}).encode()
    assert read_launch(line) == (["--spare", "{}"], {"A": "1"})
