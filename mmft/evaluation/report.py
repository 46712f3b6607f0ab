"""Write an evaluation report: report.json, report.md (tables to read at a glance) and PNG plots.

    write_report(report, "runs/x/eval")  # report: the dict mmft.evaluate returns

Plots (matplotlib, Agg backend): recall_bars.png (each row's R@k with 95% CI error bars, one panel per
set) and lora_sweep.png (domain vs general recall across LoRA scales, points labelled by scale).
"""
from __future__ import annotations

from pathlib import Path

from mmft.io import atomic_path, write_json

DIRS = (("t2i", "text→image"), ("i2t", "image→text"))


def _ks(report: dict) -> list[int]:
    return list(report["config"]["ks"])


def _cell(m: dict, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = m["ci"]
    return f"{fmt.format(m['value'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _recall_cells(row: dict, cols: list[tuple[str, int]], signed: bool = False) -> list[str]:
    """R@k with its CI for each (direction, k) of `cols`, from a metrics or deltas row."""
    return [_cell(row[d][f"R@{k}"], signed) for d, k in cols]


def metrics_table(report: dict, set_name: str) -> list[str]:
    """Markdown rows: each model row, then each delta row vs the first, R@k with CIs."""
    ks = _ks(report)
    cols = [(d, k) for d, _ in DIRS for k in ks]
    head = ([f"{d} R@{k}" for d, k in cols] + ["mAP@10 t2i / i2t", "median rank t2i / i2t"])
    lines = ["| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    table, deltas = report["metrics"][set_name], report["deltas"][set_name]
    for name, row in table.items():
        cells = _recall_cells(row, cols)
        cells.append(f"{row['t2i']['mAP@10']['value']:.1f} / {row['i2t']['mAP@10']['value']:.1f}")
        cells.append(f"{row['t2i']['median_rank']:g} / {row['i2t']['median_rank']:g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = report["rows"][0]
    for name, row in deltas.items():
        cells = _recall_cells(row, cols, signed=True)
        cells.append(f"{row['t2i']['mAP@10']['value']:+.1f} / {row['i2t']['mAP@10']['value']:+.1f}")
        cells.append("")
        bold = " | ".join(f"**{c}**" if c else c for c in cells)
        lines.append(f"| **Δ {name} − {first}** | " + bold + " |")
    return lines


def summary_table(report: dict) -> str:
    """One compact table over every set: R@1/R@5 both ways per row with 95% CIs, then each row's delta
    against the first row, and the recommended LoRA scale (what `mmft demo` prints at the end)."""
    cols = [("t2i", 1), ("t2i", 5), ("i2t", 1), ("i2t", 5)]
    lines = ["| set | row | " + " | ".join(f"{d} R@{k}" for d, k in cols) + " |",
             "|---" * (2 + len(cols)) + "|"]
    for set_name, rows in report["metrics"].items():
        lines += [f"| {set_name} | {row} | " + " | ".join(_recall_cells(m, cols)) + " |"
                  for row, m in rows.items()]
        lines += [f"| {set_name} | Δ {row} | " + " | ".join(_recall_cells(m, cols, signed=True)) + " |"
                  for row, m in report["deltas"][set_name].items()]
    sweep = report.get("sweep")
    if sweep:
        lines.append(f"\nrecommended LoRA scale: {sweep['recommended_lora_scale']:g} ({sweep['rule']})")
    return "\n".join(lines)


def per_group_table(per_group: dict) -> list[str]:
    """Markdown rows: image->text R@1 of each model row per group (with class captions, per-class
    accuracy)."""
    groups = list(dict.fromkeys(g for row in per_group.values() for g in row))
    first = next(iter(per_group.values()))
    head = [f"{g} ({first[g]['queries']})" if g in first else g for g in groups]
    lines = ["| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, row in per_group.items():
        cells = " | ".join(f"{row[g]['R@1']:.1f}" if g in row else "" for g in groups)
        lines.append(f"| {name} | " + cells + " |")
    return lines


def sweep_table(sweep: dict) -> list[str]:
    has_general = any(p.get("general") for p in sweep["points"])
    head = ["LoRA scale", "domain t2i R@1", "domain t2i R@5", "domain i2t R@1", "domain i2t R@5",
            "domain score"]
    if has_general:
        head += ["general t2i R@5", "general i2t R@5", "general drop", "allowed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in sweep["points"]:
        dom = p["domain"]
        cells = [f"{p['lora_scale']:g}"] + [f"{dom[d][m]:.1f}" for d, m in
                                           (("t2i", "R@1"), ("t2i", "R@5"), ("i2t", "R@1"), ("i2t", "R@5"))]
        cells.append(f"{p['score']:.1f}")
        if has_general:
            gen = p["general"]
            cells += [f"{gen['t2i']['R@5']:.1f}", f"{gen['i2t']['R@5']:.1f}", f"{p['general_drop']:+.1f}",
                      "yes" if p["allowed"] else "no"]
        if p["lora_scale"] == sweep["recommended_lora_scale"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def approximate_table(approx: dict) -> list[str]:
    lines = ["| set | row | direction | metric | exact | approximate | lost |", "|---" * 7 + "|"]
    for set_name, rows in approx.items():
        for row, dirs in rows.items():
            for d, ms in dirs.items():
                for m, v in ms.items():
                    lines.append(f"| {set_name} | {row} | {d} | {m} | {v['exact']:.1f} | "
                                 f"{v['approximate']:.1f} | {v['loss']:.2f} |")
    return lines


def markdown(report: dict, plots: list[str]) -> str:
    from mmft.embeddings import describe_fingerprint

    cfg = report["config"]
    intro = (f"Model: {describe_fingerprint(report['model'])}. "
             f"Search: FAISS `{cfg['factory']}` (inner product on "
             f"unit vectors). Values in points (%); [95% CI]: percentile bootstrap over queries "
             f"({cfg['bootstrap']} resamples, seed {cfg['seed']}); Δ rows resample the same queries for both "
             "rows (paired). A text query hits when its image is in the top k; an image query hits when "
             "any of its captions is. Median rank: 1-based rank of the first relevant item.")
    out = ["# Retrieval report", "", intro, ""]
    for set_name, info in report["sets"].items():
        title = (f"## {set_name}: {info['images']} images, {info['captions']} captions "
                 f"({info['relevance']} relevance)")
        out += [title, ""] + metrics_table(report, set_name) + [""]
        per_group = report.get("per_group", {}).get(set_name)
        if per_group:
            note = ("Image→text R@1 per group (queries in brackets); with class captions this is per-class "
                    "accuracy:")
            out += [note, ""] + per_group_table(per_group) + [""]
    sweep = report.get("sweep")
    if sweep:
        note = "The fine-tuning delta scaled by each factor (0 = frozen base, 1 = tuned), no retraining."
        out += ["## LoRA scale sweep", "", note, ""] + sweep_table(sweep)
        out += ["", f"**Recommended LoRA scale: {sweep['recommended_lora_scale']:g}** ({sweep['rule']}).", ""]
    if report.get("approximate"):
        out += [f"## Approximate index `{cfg['factory']}` vs exact search", ""] + approximate_table(
            report["approximate"]) + [""]
    out += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot_recall_bars(report: dict, path: Path) -> None:
    """One panel per set: grouped bars of R@k both ways per row, 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets, rows, ks = list(report["metrics"]), report["rows"], _ks(report)
    labels = [f"{arrow}\nR@{k}" for _, arrow in DIRS for k in ks]
    fig, axes = plt.subplots(1, len(sets), figsize=(1.2 + 5.2 * len(sets), 4.2), squeeze=False)
    width = 0.8 / len(rows)
    for ax, set_name in zip(axes[0], sets):
        x = np.arange(len(labels))
        for i, row in enumerate(rows):
            ms = [report["metrics"][set_name][row][d][f"R@{k}"] for d, _ in DIRS for k in ks]
            vals = np.array([m["value"] for m in ms])
            err = np.abs(np.array([m["ci"] for m in ms]).T - vals)  # (2, n)
            bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=row)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        info = report["sets"][set_name]
        ax.set_title(f"{set_name} ({info['images']} images, {info['captions']} captions)")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("recall (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_sweep(report: dict, path: Path) -> None:
    """Left: recall vs LoRA scale. Right: domain score vs general R@5, points labelled by scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["sweep"]
    pts = sweep["points"]
    a = [p["lora_scale"] for p in pts]
    has_general = all(p.get("general") for p in pts)
    fig, axes = plt.subplots(1, 2 if has_general else 1, figsize=(11 if has_general else 5.5, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    ax.plot(a, [p["score"] for p in pts], "o-", label="domain: mean R@1/R@5 both ways")
    if has_general:
        gen = [sum(p["general"][d]["R@5"] for d, _ in DIRS) / 2 for p in pts]
        ax.plot(a, gen, "s-", label="general: mean R@5 both ways")
    ax.axvline(sweep["recommended_lora_scale"], color="grey", ls="--", lw=1, label="recommended")
    ax.set_xlabel("LoRA scale (0 = frozen base, 1 = tuned)")
    ax.set_ylabel("recall (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_general:
        ax = axes[0][1]
        dom = [p["score"] for p in pts]
        ax.plot(gen, dom, "-", color="tab:purple", alpha=0.5)
        for allowed, marker, color, name in ((True, "o", "tab:purple", "allowed"),
                                             (False, "X", "grey", "not allowed (general drop)")):
            sel = [i for i, p in enumerate(pts) if p["allowed"] == allowed]
            if sel:
                ax.plot([gen[i] for i in sel], [dom[i] for i in sel], marker, color=color, ls="", label=name)
        for g, d, p in zip(gen, dom, pts):
            ax.annotate(f"α={p['lora_scale']:g}", (g, d), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        best = next(p for p in pts if p["lora_scale"] == sweep["recommended_lora_scale"])
        ax.plot([gen[pts.index(best)]], [best["score"]], "*", ms=16, color="tab:red", label="recommended")
        drop = report["config"].get("max_general_drop", 0)
        guard = gen[0] - drop
        lo = min(min(gen), guard) - 1
        ax.axvspan(lo, guard, color="tab:red", alpha=0.07, label=f"mean general R@5 down > {drop:g} pts")
        ax.set_xlim(lo, max(gen) + 0.15 * (max(gen) - lo))
        ax.set_xlabel("general: mean R@5 both ways (%)  ← forgets more")
        ax.set_ylabel("domain: mean R@1/R@5 both ways (%)")
        ax.set_title("domain gain vs general forgetting")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, recall_bars.png and (with a sweep) lora_sweep.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md",
             "bars": out_dir / "recall_bars.png"}
    plot_recall_bars(report, paths["bars"])
    if report.get("sweep"):
        paths["sweep"] = out_dir / "lora_sweep.png"
        plot_sweep(report, paths["sweep"])
    plots = [p.name for k, p in paths.items() if p.suffix == ".png"]
    write_json(paths["json"], report)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown(report, plots))
    return paths
