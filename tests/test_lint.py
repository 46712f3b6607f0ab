"""The lint gate: `ruff check mmft tests tools` is clean under pyproject.toml's rules.

Those are ruff's default rules plus E501 at the 110-character line length of the house style. ruff is
in the dev extra that `make test` installs, pinned in constraints.txt because its default rule set
moves between releases; without it the tests skip and say so.

One more check ruff has no rule for: no file mmft or its tools read can run code. torch.load always
says weights_only=True (mmft supports torch 2.4 and 2.5, where the default still unpickles), np.load never
allows pickles, and nothing reads a file with pickle or an unsafe YAML loader.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["mmft", "tests", "tools"]

needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff is not installed (it comes with the dev extra: make test)")


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # The ruff package ships the binary and runs it with `python -m ruff`; cwd=ROOT picks pyproject.toml.
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300,
                          check=False)


@needs_ruff
def test_ruff_check_is_clean():
    out = _ruff(*PATHS)
    if out.returncode != 0:
        pytest.fail(f"`ruff check {' '.join(PATHS)}` reports:\n{out.stdout}{out.stderr}", pytrace=False)


@needs_ruff
def test_the_line_length_rule_is_on_at_110():
    # The clean run above proves nothing about line length if E501 fell out of the configuration.
    fits, long = "x = '" + "a" * 104 + "'\n", "x = '" + "a" * 105 + "'\n"  # 110 and 111 characters
    assert len(fits) - 1 == 110 and len(long) - 1 == 111
    ok = _ruff("--stdin-filename", "tests/line_length_probe.py", "-", stdin=fits)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _ruff("--stdin-filename", "tests/line_length_probe.py", "-", stdin=long)
    report = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "E501" in bad.stdout and "(111 > 110)" in bad.stdout, report


# --- no file read can run code -------------------------------------------------------------------

UNPICKLERS = ("pickle.load", "pickle.Unpickler", "joblib.load", "dill.load", "dill.loads", "cloudpickle.load",
              "yaml.unsafe_load", "yaml.full_load")


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)] if isinstance(node, ast.Name) else [])


def code_running_loads(source: str) -> list[str]:
    """'line: call' for each call in `source` that may run code stored in what it reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value.value if isinstance(k.value, ast.Constant) else k.value
              for k in node.keywords if k.arg}
        round_trip = bool(node.args) and isinstance(node.args[0], ast.Call) and \
            _dotted(node.args[0].func) == "pickle.dumps"  # loads(dumps(x)): a copy of our own object
        loader = kw.get("Loader")
        safe_yaml = isinstance(loader, ast.Attribute) and "Safe" in loader.attr
        unsafe = ((name == "torch.load" and kw.get("weights_only") is not True)
                  or (name.endswith("load") and kw.get("allow_pickle") is True)
                  or name in UNPICKLERS or (name == "pickle.loads" and not round_trip)
                  or (name == "yaml.load" and not safe_yaml))
        if unsafe:
            found.append(f"{node.lineno}: {name}")
    return found


def test_no_file_read_can_run_code():
    offenders = {str(p.relative_to(ROOT)): code_running_loads(p.read_text())
                 for folder in ("mmft", "tools", "eval") for p in sorted((ROOT / folder).rglob("*.py"))}
    offenders = {p: calls for p, calls in offenders.items() if calls}
    assert offenders == {}, ("these may run code stored in the file they read (pass weights_only=True, keep "
                             f"allow_pickle off, use yaml.safe_load): {offenders}")


def test_the_load_check_sees_each_unsafe_form():
    unsafe = ["torch.load(p)", "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)",
              "pickle.load(f)", "pickle.loads(f.read())", "yaml.load(f)", "yaml.load(f, Loader=yaml.Loader)"]
    safe = ["torch.load(p, map_location='cpu', weights_only=True)", "np.load(p)", "np.load(p, mmap_mode='r')",
            "pickle.loads(pickle.dumps(e))", "yaml.safe_load(f)", "yaml.load(f, Loader=yaml.SafeLoader)",
            "np.save(p, a, allow_pickle=True)"]
    expected = [f"{line}: {call.split('(')[0]}" for line, call in enumerate(unsafe, 1)]
    assert code_running_loads("\n".join(unsafe)) == expected
    assert code_running_loads("\n".join(safe)) == []
