"""The scaling picture of a load-test run: output tokens/s, TTFT and ITL against users, one line per
target and scenario on shared axes, so ours and the peer read side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by "target / scenario", each sorted by user count."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['target']} / {row['scenario']}", []).append(row)
    return {name: sorted(runs, key=lambda r: r["users"]) for name, runs in groups.items()}


def write(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Writes the PNG and returns its path; None when there is nothing to draw or no matplotlib."""
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("output tokens/s", lambda s: [(s["output_tok_per_s"], "")]),
              ("TTFT ms", lambda s: _quantiles(s, "ttft")),
              ("ITL ms", lambda s: _quantiles(s, "itl"))]
    groups = series(rows)
    colors = {name: f"C{i}" for i, name in enumerate(groups)}  # one colour per target, in every panel
    for ax, (label, values) in zip(axes, panels):
        for name, runs in groups.items():
            users = [r["users"] for r in runs]
            per_run = [values(r["summary"]) for r in runs]
            for i, (_, suffix) in enumerate(per_run[0] if per_run else []):
                ys = [v[i][0] if len(v) > i else float("nan") for v in per_run]
                ax.plot(users, ys, marker="o", color=colors[name], linestyle="-" if i == 0 else "--",
                        label=f"{name}{suffix}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["users"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _quantiles(summary: dict[str, Any], metric: str) -> list[tuple[float, str]]:
    m = summary.get(metric) or {}
    if not m.get("count"):
        return [(float("nan"), " p50"), (float("nan"), " p99")]
    return [(m["p50"], " p50"), (m["p99"], " p99")]
