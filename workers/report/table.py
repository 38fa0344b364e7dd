"""One comparison table across finished runs (``embedpipe table``): rows are descriptor × post-processing ×
re-ranking, columns the runs' datasets, cells mAP (or mP@10), the best cell of each column marked; the
shape of the classic tables (e.g. Babenko & Lempitsky 2015: Oxford5k, Oxford105k, Holidays at 128 dims).

Pure: reads each run's ``report/metrics.json`` and nothing else; renders Markdown, CSV, HTML or JSON.

Columns. A run gives one column labelled by its protocol and its dataset folder's name (the name alone
when it is the protocol's, as ``embedpipe datasets fetch`` names them). A run whose rows were evaluated
with distractors (``"distractors": N > 0``) is labelled "<dataset> +<N> distractors", and each other
point of its ``distractor_curve`` (mAP only; not for the revisited protocols, whose curve holds Medium
alone) is a column of its own, step 0 being the plain dataset. The revisited protocols (roxford5k,
rparis6k) give two columns, their Medium and Hard setups ("ROxf M", "ROxf H"). Two columns with the same
label are told apart by their run directories' names.

Rows. A result row is keyed by (descriptor, backbone, post, rerank); the same key in several runs is one
table row. ``dim`` filters on the row's ``dim`` field: the dimension of the vectors indexed and searched,
i.e. the descriptor after its post-processing (``l2``: the raw descriptor, ``pcaw128``: 128), not the
inside of an index factory such as ``PCA64,PQ32``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from embedpipe.storage.contracts.errors import InputError

METRICS = ("map", "mp@10")
FORMATS = ("md", "csv", "html", "json")
REVISITED = {"roxford5k": "ROxf", "rparis6k": "RPar"}
SETUPS = (("medium", "M"), ("hard", "H"))
KEY_FIELDS = ("descriptor", "backbone", "post", "rerank")


@dataclass(frozen=True)
class Column:
    """One column: where its cells come from (``values``: row key -> value) and how it is labelled."""

    label: str
    run: str
    protocol: str
    dataset: str
    distractors: int
    setup: str | None
    values: dict[tuple[str, ...], float | None] = field(repr=False, compare=False)


@dataclass
class Row:
    key: tuple[str, ...]
    dims: set[int]


@dataclass(frozen=True)
class Table:
    metric: str
    dim: int | None
    columns: list[Column]
    rows: list[Row]

    def cell(self, row: Row, column: Column) -> float | None:
        return column.values.get(row.key)

    def best(self, column: Column) -> float | None:
        values = [v for r in self.rows if (v := self.cell(r, column)) is not None]
        return max(values) if values else None


TIE = 1e-9  # cells this close to a column's best are best too (the same mAP summed in another order)


def is_best(value: float | None, top: float | None) -> bool:
    return value is not None and top is not None and value >= top - TIE


def read_metrics(run: Path) -> dict[str, Any]:
    """A finished run's ``report/metrics.json`` (read only)."""
    path = Path(run) / "report" / "metrics.json"
    if not path.is_file():
        raise InputError(f"{run} is not a finished run (no report/metrics.json)")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not readable as JSON ({err})") from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), list):
        raise InputError(f"{path}: no 'results' list")
    for i, row in enumerate(metrics["results"]):
        missing = [k for k in ("descriptor", "post", "dim") if not isinstance(row, dict) or k not in row]
        if missing:
            raise InputError(f"{path}: result {i} has no {', '.join(missing)}")
    return metrics


def dataset_name(path: str) -> str:
    """The dataset folder's name from the run's ``dataset.path``: its last part that is no glob or
    shard pattern (``/data/oxford5k`` -> ``oxford5k``, ``/data/set/*.jpg`` -> ``set``)."""
    parts = [p for p in PurePosixPath(str(path).rstrip("/")).parts if p != "/"]
    plain = [p for p in parts if not any(ch in p for ch in "*?[{")]
    return plain[-1] if plain else str(path)


def count_label(n: int) -> str:
    """Three significant digits: 100071 -> '100k', 99782 -> '99.8k', 1001001 -> '1M', 2500 -> '2.5k'."""
    for size, unit in ((1_000_000, "M"), (1000, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(k) or ("none" if k == "rerank" else "")) for k in KEY_FIELDS)


def _value(row: dict[str, Any], name: str) -> float | None:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def run_columns(run: Path, metrics: dict[str, Any], metric: str, keep) -> list[Column]:
    """The columns one run gives (see the module's docstring); ``keep(row)`` picks its rows."""
    protocol = str(metrics.get("protocol", ""))
    if protocol == "none":
        raise InputError(f"{run}: protocol 'none', nothing was scored")
    rows = [r for r in metrics["results"] if keep(r)]
    name = dataset_name(metrics.get("dataset", {}).get("path", ""))
    base = REVISITED.get(protocol, protocol)
    if name.lower() != protocol.lower():
        base = f"{base}: {name}"
    full = max((int(r.get("distractors") or 0) for r in rows), default=0)
    extra = f" +{count_label(full)} distractors" if full else ""

    def column(label: str, setup: str | None, distractors: int, values) -> Column:
        return Column(label, str(run), protocol, name, distractors, setup, values)

    if protocol in REVISITED:
        return [
            column(
                f"{base} {short}{extra}", setup, full, {_key(r): _value(r, f"{metric}_{setup}") for r in rows}
            )
            for setup, short in SETUPS
        ]
    columns = [column(f"{base}{extra}", None, full, {_key(r): _value(r, metric) for r in rows})]
    if metric == "map":
        # curve points name no backbone: matched to the run's rows by descriptor, post and rerank
        keys = {(k[0], k[2], k[3]): k for k in map(_key, rows)}
        steps: dict[int, dict[tuple[str, ...], float | None]] = {}
        for point in metrics.get("distractor_curve") or []:
            n = int(point.get("distractors") or 0)
            found = keys.get(tuple(str(point.get(k) or "none") for k in ("descriptor", "post", "rerank")))
            if n != full and found is not None:
                steps.setdefault(n, {})[found] = _value(point, "map")
        for n in sorted(steps):
            label = f"{base} +{count_label(n)} distractors" if n else base
            columns.append(column(label, None, n, steps[n]))
        columns.sort(key=lambda c: c.distractors)
    return columns


def build_table(runs: list[Path], metric: str = "map", dim: int | None = None) -> Table:
    """The table of ``runs`` (in the order given, their rows in the order of first appearance)."""
    if metric not in METRICS:
        raise InputError(f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
    if not runs:
        raise InputError("table: no runs given")

    def keep(row: dict[str, Any]) -> bool:
        return dim is None or row.get("dim") == dim

    columns: list[Column] = []
    rows: dict[tuple[str, ...], Row] = {}
    for run in runs:
        metrics = read_metrics(run)
        for r in metrics["results"]:
            if keep(r):
                rows.setdefault(_key(r), Row(_key(r), set())).dims.add(int(r["dim"]))
        columns += run_columns(run, metrics, metric, keep)
    if not rows:
        where = f" with dim {dim}" if dim is not None else ""
        raise InputError(f"table: no result rows{where} in {', '.join(map(str, runs))}")
    labels = [c.label for c in columns]
    columns = [
        replace(c, label=f"{c.label} [{Path(c.run).name}]") if labels.count(c.label) > 1 else c
        for c in columns
    ]
    return Table(metric, dim, columns, list(rows.values()))


def _dim_text(row: Row) -> str:
    return "/".join(str(d) for d in sorted(row.dims))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


HEAD = ("descriptor", "backbone", "post", "rerank", "dim")


def _head_cells(row: Row) -> list[str]:
    return [*row.key, _dim_text(row)]


def _metric_name(metric: str) -> str:
    return {"map": "mAP", "mp@10": "mP@10"}[metric]


def to_markdown(table: Table) -> str:
    lines = [
        "| " + " | ".join([*HEAD, *(c.label for c in table.columns)]) + " |",
        "|" + "---|" * len(HEAD) + "---:|" * len(table.columns),
    ]
    best = [table.best(c) for c in table.columns]
    for row in table.rows:
        cells = []
        for c, top in zip(table.columns, best, strict=True):
            v = table.cell(row, c)
            cells.append(f"**{_fmt(v)}**" if is_best(v, top) else _fmt(v))
        lines.append("| " + " | ".join([*_head_cells(row), *cells]) + " |")
    note = f"{_metric_name(table.metric)}; best of each column in bold"
    if table.dim is not None:
        note += f"; rows of dimension {table.dim}"
    return "\n".join(lines) + f"\n\n{note}.\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*HEAD, *(x for c in table.columns for x in (c.label, f"{c.label} best"))])
    best = [table.best(c) for c in table.columns]
    for row in table.rows:
        cells = []
        for c, top in zip(table.columns, best, strict=True):
            v = table.cell(row, c)
            cells += ["" if v is None else repr(v), int(is_best(v, top))]
        writer.writerow([*_head_cells(row), *cells])
    return buf.getvalue()


def to_json(table: Table) -> dict[str, Any]:
    best = [table.best(c) for c in table.columns]
    return {
        "metric": table.metric,
        "dim": table.dim,
        "columns": [
            {
                "label": c.label,
                "run": c.run,
                "protocol": c.protocol,
                "dataset": c.dataset,
                "distractors": c.distractors,
                "setup": c.setup,
            }
            for c in table.columns
        ],
        "rows": [
            {
                **dict(zip(KEY_FIELDS, row.key, strict=True)),
                "dim": sorted(row.dims)[0] if len(row.dims) == 1 else sorted(row.dims),
                "cells": [
                    {"value": (v := table.cell(row, c)), "best": is_best(v, top)}
                    for c, top in zip(table.columns, best, strict=True)
                ],
            }
            for row in table.rows
        ],
    }


_STYLE = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:80rem;color:#1d232b;padding:0 1rem}"
    "table{border-collapse:collapse}th,td{padding:.3rem .6rem;border-bottom:1px solid #dde1e6;"
    "text-align:right}th{background:#f3f5f7}td.t,th.t{text-align:left}td.best{background:#eefaf1}"
    ".muted{color:#68717d}"
)


def to_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th class='t'>{esc(h)}</th>" for h in HEAD)
    head += "".join(f"<th>{esc(c.label)}</th>" for c in table.columns)
    best = [table.best(c) for c in table.columns]
    body = []
    for row in table.rows:
        cells = "".join(f"<td class='t'>{esc(x)}</td>" for x in _head_cells(row))
        for c, top in zip(table.columns, best, strict=True):
            v = table.cell(row, c)
            mark = is_best(v, top)
            cells += f"<td class='best'><b>{_fmt(v)}</b></td>" if mark else f"<td>{_fmt(v)}</td>"
        body.append(f"<tr>{cells}</tr>")
    runs = "".join(f"<li><code>{esc(r)}</code></li>" for r in dict.fromkeys(c.run for c in table.columns))
    dim = f", rows of dimension {table.dim}" if table.dim is not None else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe table</title>"
        f"<style>{_STYLE}</style></head><body>\n<h1>Comparison table</h1>\n"
        f"<p class='muted'>{_metric_name(table.metric)} per dataset; best of each column in bold{dim}.</p>\n"
        f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>\n"
        f"<p class='muted'>Runs:</p><ul>{runs}</ul>\n</body></html>\n"
    )


def render(table: Table, fmt: str) -> str:
    """The table as text in ``fmt`` (md, csv, html, json)."""
    if fmt == "md":
        return to_markdown(table)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "html":
        return to_html(table)
    if fmt == "json":
        return json.dumps(to_json(table), indent=2) + "\n"
    raise InputError(f"unknown table format '{fmt}' (known: {', '.join(FORMATS)})")
