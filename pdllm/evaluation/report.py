"""Summaries of evaluation records: the accuracy table, per-depth accuracy, and the depth plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def summarize(records: list[dict], keys: tuple[str, ...] = ("task", "length", "mode")) -> list[dict]:
    """Mean score (accuracy, 0..100), mean step time and mean KV tokens read per step, grouped by `keys`."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    rows = []
    for key, every in sorted(groups.items(), key=lambda kv: tuple(str(x).zfill(8) for x in kv[0])):
        rs = [r for r in every if not r.get("skipped")]
        if not rs:  # not run (e.g. a dense baseline past the model's length): n/a, with the reason
            rows.append(dict(zip(keys, key, strict=True)) | {"n": 0, "accuracy": None, "mean_step_ms": None,
                                                               "kv_tokens_per_step": None, "mean_steps": None,
                                                               "skipped": every[0]["skipped"]})  # fmt: skip
            continue
        kv = [r["kv_tokens_per_step"] for r in rs if r["kv_tokens_per_step"] is not None]
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "n": len(rs),
                "accuracy": round(100 * sum(r["score"] for r in rs) / len(rs), 1),
                "mean_step_ms": round(sum(r["mean_step_ms"] for r in rs) / len(rs), 3),
                "kv_tokens_per_step": round(sum(kv) / len(kv)) if kv else None,
                "mean_steps": round(sum(r["steps"] for r in rs) / len(rs), 2),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'task':16} {'length':>7} {'mode':8} {'n':>4} {'acc%':>6} {'ms/step':>8} {'KV tok/step':>11} {'steps':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["accuracy"] is None:
            lines.append(f"{r['task']:16} {r['length']:>7} {r['mode']:8} {0:>4} {'n/a':>6}  ({r.get('skipped')})")
            continue
        kv = "-" if r["kv_tokens_per_step"] is None else str(r["kv_tokens_per_step"])
        lines.append(
            f"{r['task']:16} {r['length']:>7} {r['mode']:8} {r['n']:>4} {r['accuracy']:>6.1f} "
            f"{r['mean_step_ms']:>8.2f} {kv:>11} {r['mean_steps']:>6.2f}"
        )
    return "\n".join(lines)


def plot_depth(records: list[dict], path: str | Path) -> Path:
    """Accuracy against needle depth, one line per (mode, length), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records, ("task", "mode", "length", "depth"))
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        series: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["task"] == task and r["accuracy"] is not None:
                series[(r["mode"], r["length"])].append((r["depth"], r["accuracy"]))
        for (mode, length), pts in sorted(series.items()):
            pts.sort()
            ax.plot([100 * d for d, _ in pts], [a for _, a in pts], marker="o", label=f"{mode} {length}")
        ax.set_title(task)
        ax.set_xlabel("needle depth (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
