#!/usr/bin/env python
"""Gather what tools/gpu_check.sh measured into gpu_check.json and a markdown page.

    python tools/gpu_report.py OUT_DIR [--docs docs/gpu_check.md]

OUT_DIR holds the step files the script wrote: steps.tsv (step, exit status, seconds), env.json,
pytest.txt (the gpu-marked tests' output), loss.jsonl (tools/bench_loss.py --json) and index.jsonl
(tools/bench_index.py --json). A missing file is a step that did not run; it is reported as such.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))


def _jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file (bench_loss) or of one JSON list (bench_index); none if it is missing."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _steps(out: Path) -> list[dict]:
    rows = []
    if (out / "steps.tsv").is_file():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            if rc == "skipped":  # not run, on purpose; its log says why
                reason = (out / f"{name}.log").read_text().strip() if (out / f"{name}.log").is_file() else ""
                rows.append({"step": name, "exit": None, "status": reason or "skipped", "seconds": 0.0})
                continue
            status = "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else f"failed (exit {rc})")
            rows.append({"step": name, "exit": int(rc), "status": status, "seconds": float(secs)})
    return rows


def _pytest_summary(out: Path) -> str:
    """The final '3 passed, 2 skipped in 4.1s' line of the gpu-marked tests, or why there is none."""
    path = out / "pytest.txt"
    if not path.is_file():
        return "not run"
    summary = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)")
    lines = [ln.strip("= ") for ln in path.read_text().splitlines() if summary.search(ln)]
    return lines[-1] if lines else "no summary (see pytest.txt)"


def gather(out: Path) -> dict:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    return {"env": env, "steps": _steps(out), "gpu_tests": _pytest_summary(out),
            "loss": _jsonl(out / "loss.jsonl"), "index": _jsonl(out / "index.jsonl")}


def markdown(report: dict) -> str:
    import bench_index
    import bench_loss

    env = report["env"]
    get = env.get
    machine = (f"Machine: {get('gpu', 'no GPU')}; torch {get('torch')} (CUDA {get('cuda')}), triton "
               f"{get('triton')}, FAISS {get('faiss')} (GPUs it sees: {get('faiss_gpus')}); "
               f"dry run: {get('dry_run')}.")
    lines = ["# GPU check", "", "Written by `tools/gpu_check.sh` (`--dry-run`: its CPU-sized version).", "",
             machine, "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} |" for s in report["steps"]]
    lines += ["", f"gpu-marked tests: {report['gpu_tests']}", "",
              "## Contrastive losses (forward + backward)", ""]
    loss = [(r["cfg"], r["res"]) for r in report["loss"]]
    lines.append(bench_loss.table(loss) if loss else "not measured")
    lines += ["", "## FAISS index build and search", ""]
    if report["index"]:
        lines += [bench_index.HEADER] + [bench_index._row(r, r["flat_ms"]) for r in report["index"]]
        if not any(r["device"] == "gpu" for r in report["index"]):
            lines += ["", "No GPU rows: FAISS had no GPU support or saw no GPU."]
    else:
        lines.append("not measured")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--docs", type=Path, help="also write the markdown here (e.g. docs/gpu_check.md)")
    args = p.parse_args(argv)
    report = gather(args.out)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    page = markdown(report)
    (args.out / "gpu_check.md").write_text(page)
    if args.docs:
        args.docs.write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
