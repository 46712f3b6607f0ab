"""Evaluation stage: domain and general recall against the frozen baseline, with intervals.

- core: `evaluate`, `evaluate_run`, the LoRA-scale sweep;
- metrics: recall, mAP and ranks from FAISS results, with a brute-force reference beside them;
- report: report.json, report.md and the plots.
"""
