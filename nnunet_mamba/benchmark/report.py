"""Tables (Markdown, CSV, JSON) and plots of benchmark rows. Rows are flat dicts; ``None`` is shown as n/a."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[object], str] = str


def fmt_num(digits: int) -> Callable[[object], str]:
    def f(v):
        return f"{v:,.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return f


def fmt_millions(v) -> str:
    return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else str(v)


def _cell(row: dict, col: Column) -> str:
    v = row.get(col.key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return col.fmt(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out_dir: str, stem: str, rows: Sequence[dict], columns: Sequence[Column], meta: dict,
                  notes: str = "") -> dict:
    """Write ``{stem}.md``, ``{stem}.csv`` (every key of every row) and ``{stem}.json`` (meta + rows)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "csv", "json")}
    with open(paths["md"], "w") as f:
        f.write(markdown_table(rows, columns) + "\n")
        if notes:
            f.write("\n" + notes.strip() + "\n")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in keys})
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=2)
    return paths


def _csv_value(v):
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return "" if v is None else v


def scatter_plot(path: str, points: Sequence[dict], x: str, y: str, xlabel: str, ylabel: str, title: str,
                 size: Optional[str] = None, size_label: str = "", yerr: Optional[tuple] = None,
                 logx: bool = False, logy: bool = False) -> Optional[str]:
    """One labelled marker per point (``label`` key); marker area proportional to ``size`` when given.

    ``yerr``: keys (low, high) of an error bar. Returns the PNG path, or None when no point has both values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if isinstance(p.get(x), (int, float)) and isinstance(p.get(y), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sizes = [60.0] * len(pts)
    if size:
        vals = [p.get(size) for p in pts]
        top = max((v for v in vals if isinstance(v, (int, float))), default=0) or 1
        sizes = [40 + 800 * v / top if isinstance(v, (int, float)) else 40 for v in vals]
    for p, s in zip(pts, sizes):
        ax.scatter(p[x], p[y], s=s, alpha=0.55)
        if yerr and isinstance(p.get(yerr[0]), (int, float)) and isinstance(p.get(yerr[1]), (int, float)):
            ax.errorbar(p[x], p[y], yerr=[[p[y] - p[yerr[0]]], [p[yerr[1]] - p[y]]], fmt="none", ecolor="gray",
                        capsize=3)
        ax.annotate(p["label"], (p[x], p[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\nmarker area ~ {size_label}" if size else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
