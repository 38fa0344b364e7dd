"""The human report: report/index.html, a single self-contained page (pure string building)."""

from __future__ import annotations

import html
import json
from typing import Any

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#1d232b;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.3rem .7rem;border-bottom:1px solid #dde1e6;
text-align:right}th{background:#f3f5f7}td:first-child,th:first-child,td.l{text-align:left}
.best{font-weight:700;color:#0a6b2f}.muted{color:#68717d}pre{background:#f6f8fa;padding:.8rem;overflow:auto}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]], best_col: int | None = None) -> str:
    best = (
        max((r[best_col] for r in rows if isinstance(r[best_col], float)), default=None)
        if best_col is not None
        else None
    )
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        cells = []
        for j, v in enumerate(r):
            cls = ' class="best"' if best is not None and j == best_col and v == best else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def render_report(
    metrics: dict[str, Any],
    timings: dict[str, float],
    quarantine: list[dict[str, Any]],
    config: dict[str, Any],
) -> str:
    ds = metrics["dataset"]
    columns = [
        ("descriptor", "descriptor"),
        ("post", "post-processing"),
        ("rerank", "re-ranking"),
        ("backbone", "backbone"),
        ("dim", "dim"),
        ("index", "index"),
        ("bytes_per_vector", "bytes/vector"),
        ("map", "mAP"),
        ("mp@1", "mP@1"),
        ("mp@5", "mP@5"),
        ("mp@10", "mP@10"),
        ("time_s", "time (s)"),
    ]
    cols = [key for key, _ in columns]
    rows = [[r.get(c) for c in cols] for r in metrics["results"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>embedpipe retrieval report</h1>",
        f"<p>Protocol <b>{html.escape(metrics['protocol'])}</b> on "
        f"<code>{html.escape(str(ds['path']))}</code>: "
        f"{ds['n_images']} images, {ds['n_queries']} queries, {ds.get('n_quarantined', 0)} quarantined.</p>",
        "<h2>Results</h2>",
        _table(
            [header for _, header in columns],
            rows,
            best_col=cols.index("map"),
        ),
        "<p class='muted'>mAP: trapezoidal AP as in the reference evaluation code (revisitop / Holidays), "
        "query removed from its own ranking.</p>",
        "<h2>Stage timings</h2>",
        _table(["stage", "seconds"], [[k, float(v)] for k, v in timings.items()]),
    ]
    if quarantine:
        parts += [
            "<h2>Quarantined inputs</h2>",
            _table(["path", "stage", "reason"], [[q["path"], q["stage"], q["reason"]] for q in quarantine]),
        ]
    parts += [
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
