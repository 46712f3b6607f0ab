"""The lint gate: `ruff check mmft tests tools` is clean under pyproject.toml's rules.

Those are ruff's default rules plus E501 at the 110-character line length of the house style. ruff is
in the dev extra that `make test` installs, pinned in constraints.txt because its default rule set
moves between releases; without it the tests skip and say so.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["mmft", "tests", "tools"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff is not installed (it comes with the dev extra: make test)")


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # The ruff package ships the binary and runs it with `python -m ruff`; cwd=ROOT picks pyproject.toml.
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300,
                          check=False)


def test_ruff_check_is_clean():
    out = _ruff(*PATHS)
    if out.returncode != 0:
        pytest.fail(f"`ruff check {' '.join(PATHS)}` reports:\n{out.stdout}{out.stderr}", pytrace=False)


def test_the_line_length_rule_is_on_at_110():
    # The clean run above proves nothing about line length if E501 fell out of the configuration.
    fits, long = "x = '" + "a" * 104 + "'\n", "x = '" + "a" * 105 + "'\n"  # 110 and 111 characters
    assert len(fits) - 1 == 110 and len(long) - 1 == 111
    ok = _ruff("--stdin-filename", "tests/line_length_probe.py", "-", stdin=fits)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _ruff("--stdin-filename", "tests/line_length_probe.py", "-", stdin=long)
    report = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "E501" in bad.stdout and "(111 > 110)" in bad.stdout, report
