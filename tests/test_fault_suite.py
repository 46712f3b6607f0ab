"""tools/fault_suite.py: every fast fault case survives all its faults, and the table marks what has not run.

The cases are the suite's own functions (tools/faults/), so the figures in docs/reliability.md and this
test cannot drift apart.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import fault_suite
from faults import CASES, Case, Outcome

FAST = [c for c in CASES if c.run is not None and c.fast]


@pytest.mark.parametrize("case", FAST, ids=[c.run.__name__ for c in FAST])
def test_fault_case_survives_every_injected_fault(case, tmp_path):
    out, _ = fault_suite.run_case(case, tmp_path)
    assert out.injected > 0
    assert (out.survived, out.data_lost, out.crashes) == (out.injected, 0, 0), "\n".join(out.notes)


def test_table_and_docs_mark_what_has_not_run():
    ran = next(c for c in CASES if c.run is not None)
    pending = [Case("a fault nobody injects yet", "later", "survives", pending="waits for other work"),
               *(c for c in CASES if c.run is None)]
    rows = [(ran, Outcome(injected=3, survived=2, data_lost=1, crashes=0, notes=["said: no"]), 1.0)]
    rows += [(c, None, 0.0) for c in pending]
    text = fault_suite.table(rows)
    assert f"| {ran.name} | 3 | 2 | 1 | 0 |" in text
    assert text.count("not yet run") == len(pending)
    assert "| **3** | **2** | **1** | **0** |" in text
    page = fault_suite.docs(rows)
    assert text in page and "said: no" in page
    assert all(f"| {check} | {result} |" in page for check, result in fault_suite.GPU_ROWS)
