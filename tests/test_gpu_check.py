"""tools/gpu_check.sh --dry-run: the CPU-sized GPU check runs end to end, so the script cannot rot.

On a CUDA machine the same script installs GPU FAISS and measures at full size; here every step runs
at toy size and the report must hold what each step measured.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_report


def test_dry_run_measures_every_step_and_writes_the_report(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=480, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["gpu_tests", "loss_bench", "index_bench"]
    assert all(s["status"] == "ok" for s in report["steps"])
    assert report["env"]["dry_run"] is True
    assert "skipped" in report["gpu_tests"] or "passed" in report["gpu_tests"]
    loss = report["loss"]
    assert {(r["cfg"]["kind"], r["cfg"]["impl"]) for r in loss} == {
        (k, i) for k in ("infonce", "sigmoid") for i in ("open_clip", "reference", "chunked")}
    assert all(r["res"]["time_s"] > 0 for r in loss)
    index = report["index"]
    assert (index[0]["index"], index[0]["device"]) == ("Flat (exact)", "cpu")
    assert [r["target"] for r in index] == [None, 0.9] and all(r["ms"] > 0 for r in index)
    assert index[0]["recall"] == 1.0 and index[1]["recall"] >= 0.5
    page = (tmp_path / "gpu_check.md").read_text()
    assert "open_clip.ClipLoss" in page and "| separated | 4,000 | 0.90 |" in page
    assert "No GPU rows" in page


def test_report_says_what_did_not_run(tmp_path):
    (tmp_path / "steps.tsv").write_text("install\t0\t12.0\ngpu_tests\t1\t30.5\nloss_bench\t124\t190.0\n"
                                        "index_bench\tskipped\t0.0\n")
    (tmp_path / "index_bench.log").write_text("skipped: FAISS sees no GPU\n")
    (tmp_path / "pytest.txt").write_text("....F\n======= 1 failed, 4 passed in 20.1s =======\n")
    cfg = {"device": "cuda", "dtype": "bfloat16", "kind": "infonce", "impl": "triton", "B": 16384, "D": 512}
    row = {"cfg": cfg, "res": {"error": "not run: time budget"}}
    (tmp_path / "loss.jsonl").write_text(json.dumps(row) + "\n")
    report = gpu_report.gather(tmp_path)
    assert [s["status"] for s in report["steps"]] == ["ok", "failed (exit 1)", "timed out",
                                                      "skipped: FAISS sees no GPU"]
    assert report["gpu_tests"] == "1 failed, 4 passed in 20.1s"
    page = gpu_report.markdown(report)
    assert "not run: time budget" in page
    assert page.split("## FAISS index build and search")[1].strip() == "not measured"
