"""The human report: ``report/index.html``, one self-contained page (figures and thumbnails inlined),
rebuilt from the run directory alone (``embedpipe report RUN``).

Sections: summary with the winning configuration, the metrics table, precision-recall curves, per-query
AP of the winner, query result grids (positives, negatives and junk marked), a t-SNE map of the
embeddings coloured by group, stage timings, quarantined inputs, configuration and versions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from PIL import Image

from embedpipe.storage.contracts.errors import DecodeError
from embedpipe.storage.contracts.layout import STAGES, RunLayout, atomic_path
from embedpipe.storage.dataset import locations
from embedpipe.storage.features import read_features
from embedpipe.storage.quarantine import read_quarantine
from embedpipe.workers.evaluate.metrics import compute_map
from embedpipe.workers.evaluate.protocols import GroundTruth
from embedpipe.workers.extract.runtimes import report_rows
from embedpipe.workers.ingest.sources import read_input

log = logging.getLogger("embedpipe.report")

RECALLS = np.linspace(0.0, 1.0, 21)
GRID_QUERIES, GRID_RESULTS, THUMB = 8, 10, 112
MAX_TSNE_POINTS = 2000
# 250 early-exaggeration + 250 plain iterations: half scikit-learn's default and about half its time;
# the map is drawn in every run and reindex
TSNE_ITERATIONS = 500
MAX_AP_NAMES = 60  # the per-query AP bars are named up to this many queries
MAX_DENSE_BOW = 20_000_000  # BoW rows x vocabulary: above this the report draws no t-SNE map
COLUMNS = [
    ("descriptor", "descriptor"),
    ("post", "post-processing"),
    ("rerank", "re-ranking"),
    ("backbone", "backbone"),
    ("validation", "fine-tuning validation"),
    ("dim", "dim"),
    ("index", "index"),
    ("bytes_per_vector", "bytes/vector"),
    ("fitted_on", "models fitted on"),
    ("map", "mAP"),
    ("mp@1", "mP@1"),
    ("mp@5", "mP@5"),
    ("mp@10", "mP@10"),
    ("ns_score", "N-S score"),
    ("p@1", "P@1"),
    ("p@5", "P@5"),
    ("p@10", "P@10"),
    ("fewshot@1", "1-shot acc"),
    ("fewshot@5", "5-shot acc"),
    ("fewshot@10", "10-shot acc"),
    ("probe@1", "1-shot probe"),
    ("probe@5", "5-shot probe"),
    ("probe@10", "10-shot probe"),
    ("probe@full", "linear probe"),
    ("sv_shortlist", "SV shortlist"),
    ("sv_inliers", "SV inliers (best)"),
    ("sv_verified", "SV verified/query"),
    ("time_s", "time (s)"),
]

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:80rem;color:#1d232b;padding:0 1rem}
h1{font-size:1.5rem}
h2{font-size:1.15rem;margin-top:2.2rem;border-bottom:1px solid #dde1e6;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.3rem .6rem;border-bottom:1px solid #dde1e6;
text-align:right}th{background:#f3f5f7}td:first-child,th:first-child,td.t{text-align:left}
tr.best td{font-weight:700;background:#eefaf1}.muted{color:#68717d}
pre{background:#f6f8fa;padding:.8rem;overflow:auto}
.win{font-size:1.05rem;background:#eefaf1;padding:.6rem .9rem}
figure{margin:.6rem 0}figure img{max-width:100%}
.grid{display:flex;gap:6px;align-items:flex-start;margin:.5rem 0;flex-wrap:nowrap;overflow-x:auto}
.grid div{text-align:center;font-size:11px}.grid img{display:block;width:112px;height:112px;object-fit:cover;
border:4px solid #ccc}.grid .q img{border-color:#1f5fbf}.grid .pos img{border-color:#1a9c44}
.grid .neg img{border-color:#d23b3b}.grid .junk img{border-color:#9aa1a9;opacity:.6}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return "" if value is None else str(value)


def fmt_metric(value: float | None) -> str:
    """A metric for text tables: four decimals, or an em dash when it was not computed."""
    return "—" if value is None else f"{value:.4f}"


def map_of(row: dict[str, Any]) -> float:
    """Sort key: a row's mAP, -1 when it has none."""
    value = row.get("map")
    return -1.0 if value is None else float(value)


def _table(headers: list[str], rows: list[list[Any]], best: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for i, r in enumerate(rows):
        cls = ' class="best"' if i == best else ""
        cells = "".join(f"<td{' class=t' * isinstance(v, str)}>{html.escape(_fmt(v))}</td>" for v in r)
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _figure_png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnail(path: str, locate: dict[str, tuple[str, int, int]]) -> str | None:
    uri, offset, length = locate.get(path, (path, -1, -1))
    try:
        data = read_input(uri, offset, length, timeout=10.0, retries=0)
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = img.convert("RGB")
            img.thumbnail((THUMB * 2, THUMB * 2))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except (DecodeError, OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def row_label(row: dict[str, Any]) -> str:
    return f"{row['descriptor']} / {row['post']} / {row.get('rerank', 'none')}"


def pr_curve(ranks: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """Mean interpolated precision at ``RECALLS`` (junk removed), over queries with positives."""
    curves = []
    for row, pos, junk in zip(ranks, gt.positives, gt.junk, strict=True):
        if len(pos) == 0:
            continue
        row = row[~np.isin(row, junk)]
        hits = np.isin(row, pos)
        tp = np.cumsum(hits)
        precision, recall = tp / np.arange(1, len(row) + 1), tp / len(pos)
        curves.append([precision[recall >= r].max(initial=0.0) for r in RECALLS])
    return np.mean(curves, axis=0) if curves else np.zeros_like(RECALLS)


def _pr_figure(curves: dict[str, np.ndarray]) -> str:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(RECALLS, curve, marker=".", label=label)
    ax.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _figure_png(fig)


def _ap_figure(aps: np.ndarray, names: list[str], label: str) -> str:
    fig = Figure(figsize=(max(6, 0.28 * len(aps)), 3.2))
    ax = fig.subplots()
    ax.bar(range(len(aps)), np.nan_to_num(aps), color=["#1a9c44" if a >= 0.9 else "#d9822b" for a in aps])
    ax.set(ylabel="AP", ylim=(0, 1.02), title=f"per-query AP: {label}")
    if len(aps) <= MAX_AP_NAMES:
        ax.set_xticks(range(len(aps)), names, rotation=90, fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _figure_png(fig)


def _tsne_figure(vectors: Any, gt: GroundTruth | None, seed: int) -> str | None:
    """t-SNE map of at most ``MAX_TSNE_POINTS`` seeded rows of ``vectors`` (an array, or store rows read
    by position)."""
    from sklearn.manifold import TSNE

    n = len(vectors)
    if n < 5:
        return None
    rows = np.arange(n)
    if n > MAX_TSNE_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(n, MAX_TSNE_POINTS, replace=False))
    xy = TSNE(
        n_components=2,
        perplexity=min(30.0, (len(rows) - 1) / 3),
        init="pca",
        max_iter=TSNE_ITERATIONS,
        random_state=seed,
        metric="cosine",
    ).fit_transform(vectors[rows])
    groups = gt.groups[rows] if gt is not None and gt.groups is not None else np.full(len(rows), -1)
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    none = groups < 0
    ax.scatter(xy[none, 0], xy[none, 1], s=10, c="#b8bec6", label="no group")
    ax.scatter(xy[~none, 0], xy[~none, 1], s=16, c=groups[~none] % 20, cmap="tab20", vmin=0, vmax=19)
    if gt is not None and not gt.query_keys:
        for q in gt.queries:
            if q in rows:
                i = int(np.searchsorted(rows, q))
                ax.scatter(xy[i, 0], xy[i, 1], s=70, facecolors="none", edgecolors="black", linewidths=1)
    ax.set(xticks=[], yticks=[], title="t-SNE of the embeddings (colour: group; circles: queries)")
    return _figure_png(fig)


def _grids(
    ranks: np.ndarray,
    gt: GroundTruth,
    aps: np.ndarray,
    paths: Any,
    query_paths: pa.Array | pa.ChunkedArray,
    dataset: Path,
) -> str:
    """The hardest queries' result grids; only the paths of the rows shown are read out of ``paths``
    (the database's, ``StorePaths``: read by position) and ``query_paths`` (the queries' Arrow path
    column), and only their locations out of the ``dataset`` manifest."""
    order = np.argsort(np.nan_to_num(aps, nan=2.0), kind="stable")[:GRID_QUERIES]  # hardest first
    shown = ranks[order, :GRID_RESULTS]
    rows = np.where(shown < 0, shown + len(paths), shown)  # a -1 pad shows the last row, as list indexing
    queries = query_paths.take(order).to_pylist()
    results = paths.take(rows.reshape(-1)).to_pylist()
    locate = locations(dataset, [*queries, *results])
    out = [
        "<p class='muted'>Hardest queries first. Borders: blue query, green positive, red negative, "
        "grey junk (ignored).</p>"
    ]
    for i, qi in enumerate(order):
        cells = [_cell(queries[i], locate, "q", f"query · AP {_fmt(float(aps[qi]))}")]
        row_paths = results[i * shown.shape[1] : (i + 1) * shown.shape[1]]
        for rank, (r, path) in enumerate(zip(shown[i], row_paths, strict=True)):
            kind = "junk" if r in gt.junk[qi] else "pos" if r in gt.positives[qi] else "neg"
            cells.append(_cell(path, locate, kind, f"#{rank + 1} {Path(path).name}"))
        out.append("<div class='grid'>" + "".join(cells) + "</div>")
    return "\n".join(out)


def _cell(path: str, locate: dict[str, tuple[str, int, int]], kind: str, caption: str) -> str:
    src = _thumbnail(path, locate)
    img = f"<img src='{src}' alt='{html.escape(Path(path).name)}'>" if src else "<div>(missing)</div>"
    return f"<div class='{kind}'>{img}{html.escape(caption)}</div>"


def _result_vectors(layout: RunLayout, config: Any, row: dict[str, Any]) -> Any:
    """The row's database vectors (for the t-SNE map): dense BoW rows when small enough, else the store
    read by position (only the sampled rows are read)."""
    from embedpipe.workers.evaluate.stage import database_variants

    if row.get("index") == "inverted-file":  # bag of words: the tf-idf rows, dense when small enough
        from embedpipe.workers.evaluate.bow import bow_vectors, read_bow

        _, words, weights = read_bow(layout.feature_dir(row["descriptor"]))
        dense = len(words) * int(row["dim"]) <= MAX_DENSE_BOW
        return bow_vectors(words, weights, int(row["dim"]), config)[0].toarray() if dense else None
    chosen = dict(database_variants(layout, config, row["descriptor"]))
    return chosen.get(row["post"], chosen["l2"])


def _adapted_backbone(config: Any) -> list[str]:
    """A fine-tuned backbone's training collection, stated next to the evaluation collection."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    name = str(config.extract.backbone)
    if not is_finetuned(name):
        return []
    info = read_finetuned(name)
    training = info["training"]
    loss = html.escape(training["config"]["loss"])
    return [
        f"<p id='adapted'>Backbone fine-tuned by <code>embedpipe finetune</code> ({html.escape(name)}) "
        f"on the training collection <code>{html.escape(str(training['images']))}</code> "
        f"({training['n_images']} images, {training['epochs']} epochs, {loss} loss), "
        f"evaluated on the collection above. Weights: {html.escape(_validation_text(info))}.</p>"
    ]


def _validation_text(info: dict[str, Any]) -> str:
    """A fine-tuned folder's validation result (``backbone.json``), for its rows and the note above."""
    from embedpipe.workers.train.report import kept_text

    val = info.get("validation")
    return kept_text(info) + (f" on {val['images']}" if val else "")


def _with_validation(results: list[dict[str, Any]], config: Any) -> list[dict[str, Any]]:
    """Rows extracted with a fine-tuned backbone folder carry its validation result."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    name = str(config.extract.backbone)
    if not is_finetuned(name):
        return results
    text = _validation_text(read_finetuned(name))
    return [{**r, "validation": text} if r.get("backbone") == name else r for r in results]


def _transductive_note(results: list[dict[str, Any]]) -> list[str]:
    """A warning under the results when a row's learned models were fitted on the evaluated collection."""
    if not any(r.get("fitted_on") == "this collection" for r in results):
        return []
    return [
        "<p class='muted' id='transductive'><b>Models fitted on this collection:</b> rows marked "
        "'this collection' use a whitening, index quantiser or codebook learnt on the evaluated images, "
        "queries included (transductive), which flatters them. For figures to compare with the "
        "literature, learn them on another collection (<code>fit.from_run</code>, "
        "<code>bow.codebook_from</code>).</p>"
    ]


def _ranking_note(results: list[dict[str, Any]], n_images: int) -> list[str]:
    """How deep each query's ranking went (``eval.top_k``): the whole database, or truncated."""
    depths = sorted({r["top_k"] for r in results if r.get("top_k")})
    if not depths:
        return []
    if depths[0] >= n_images:
        return ["<p class='muted' id='top-k'>Each query ranks the whole database (eval.top_k).</p>"]
    return [
        f"<p class='muted' id='top-k'>Each query's ranking holds its top {', '.join(map(str, depths))} of "
        f"{n_images} images (eval.top_k); positives ranked below count as missed, as revisitop scores "
        "truncated rankings.</p>"
    ]


def _distractor_section(curve: list[dict[str, Any]]) -> list[str]:
    """mAP as distractors are added, one line per descriptor × post-processing × re-ranking."""
    if not curve:
        return []
    lines: dict[str, list[tuple[int, float]]] = {}
    for p in curve:
        label = f"{p['descriptor']} {p['post']}" + ("" if p["rerank"] == "none" else f" +{p['rerank']}")
        lines.setdefault(label, []).append((p["distractors"], p["map"]))
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for label, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="distractors in the database", ylabel="mAP", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    steps = sorted({p["distractors"] for p in curve})
    rows = [[label, *(dict(points).get(s) for s in steps)] for label, points in sorted(lines.items())]
    return [
        "<h2 id='distractors'>mAP against distractors</h2>",
        f"<figure><img alt='mAP against distractors' src='{_figure_png(fig)}'></figure>",
        _table(["descriptor", *(f"{s} distractors" for s in steps)], rows),
    ]


def _precision_change_section(change: dict[str, Any] | None) -> list[str]:
    """The mAP of each result row extracted at a reduced precision beside the same row from the eager
    torch fp32 trunk on the same collection (``extract.fp32_reference``), and the change."""
    if not change or not change.get("rows"):
        return []
    precision = html.escape(str(change.get("precision")))
    rows = [
        [r["descriptor"], r["post"], r["rerank"], f"{r['map']:.4f}", f"{r['map_fp32']:.4f}"]
        + [f"{r['change']:+.4f}"]
        for r in change["rows"]
    ]
    return [
        f"<h3 id='precision-change'>mAP change of {precision} against fp32</h3>",
        _table(
            ["descriptor", "post-processing", "re-ranking", f"mAP {precision}", "mAP fp32", "change"], rows
        ),
        f"<p class='muted'>The same descriptors from the eager torch fp32 backbone on the same images "
        f"(<code>extract.fp32_reference</code>), post-processed, indexed and re-ranked alike; change: "
        f"{precision} ({html.escape(str(change.get('runtime')))}) minus fp32.</p>",
    ]


def build_report(layout: RunLayout, config: Any) -> str:
    """Render ``report/index.html`` from the run directory (metrics.json, ranks, features, manifest)."""
    metrics = json.loads(layout.metrics.read_text())
    manifest = layout.read_manifest()
    results = _with_validation(metrics["results"], config)
    ds = metrics["dataset"]
    evaluated = [r for r in results if r.get("map") is not None]
    best = max(range(len(results)), key=lambda i: map_of(results[i])) if evaluated else None
    used = [(k, h) for k, h in COLUMNS if any(k in r for r in results)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>embedpipe retrieval report</h1>",
        f"<p>Protocol <b>{html.escape(metrics['protocol'])}</b> on "
        f"<code>{html.escape(str(ds['path']))}</code>:"
        f" {ds['n_images']} images, {ds['n_queries']} queries, {ds.get('n_quarantined', 0)} quarantined.</p>",
        *_adapted_backbone(config),
    ]
    if best is not None:
        top = results[best]
        parts.append(
            f"<p class='win' id='winner'>Best: <b>{html.escape(row_label(top))}</b> "
            f"({top['dim']} dims, {top['bytes_per_vector']} bytes/vector) with mAP "
            f"<b>{_fmt(top['map'])}</b>, mP@10 {_fmt(top.get('mp@10'))}.</p>"
        )
    parts += [
        "<h2 id='results'>Results</h2>",
        _table([h for _, h in used], [[r.get(k) for k, _ in used] for r in results], best),
        "<p class='muted'>mAP: trapezoidal AP as in revisitop's compute_map; junk (for Holidays the query "
        "itself) removed before counting. mP@k caps k at the rank of the last positive.</p>",
        *_transductive_note(results),
        *_ranking_note(results, int(ds["n_images"])),
        *_distractor_section(metrics.get("distractor_curve") or []),
    ]
    if best is not None:
        parts += _evaluation_sections(layout, config, metrics, results, best)
    stages = manifest.get("stages", {})
    parts += [
        "<h2 id='timings'>Stage timings</h2>",
        _table(
            ["stage", "seconds"], [[s, float(stages[s].get("seconds", 0.0))] for s in STAGES if s in stages]
        ),
    ]
    if runtime := report_rows(layout.root / "models"):  # the extract runtime, its parity (docs/runtimes.md)
        parts += ["<h2 id='runtime'>Extraction runtime</h2>", _table(["", "value"], runtime)]
    parts += _precision_change_section(metrics.get("precision_change"))
    quarantine = read_quarantine(layout.quarantine).to_pylist()
    parts.append("<h2 id='quarantine'>Quarantined inputs</h2>")
    parts.append(
        _table(["path", "stage", "reason"], [[q["path"], q["stage"], q["reason"]] for q in quarantine])
        if quarantine
        else "<p class='muted'>None: every input was used.</p>"
    )
    parts += [
        "<h2 id='config'>Configuration and versions</h2>",
        f"<pre>{html.escape(json.dumps(manifest.get('config', {}), indent=2, sort_keys=True))}</pre>",
        f"<pre>{html.escape(json.dumps(manifest.get('versions', {}), indent=2, sort_keys=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _evaluation_sections(
    layout: RunLayout, config: Any, metrics: dict[str, Any], results: list[dict[str, Any]], best: int
) -> list[str]:
    from embedpipe.workers.evaluate.database import StorePaths, read_database

    top = results[best]
    directory = layout.feature_dir(top["descriptor"])
    vectors = _result_vectors(layout, config, top)
    paths = StorePaths(directory)  # read by position: the queries' and the rows shown
    gt = read_database(layout, config, directory).gt
    assert gt is not None
    if gt.query_keys:  # external box-cropped queries: shown from their source images
        query_paths = read_features(layout.query_dir(top["descriptor"]))[0].column("path")
    else:
        query_paths = paths.take(gt.queries)
    curves = {}
    shown = [r for r in results if r.get("rerank", "none") == "none"] + [top]
    for r in shown[:9]:
        curves[row_label(r)] = pr_curve(np.load(layout.report_dir / r["ranks_file"]), gt)
    ranks = np.load(layout.report_dir / top["ranks_file"])
    aps = compute_map(ranks, gt.positives, gt.junk)["aps"]
    names = [Path(p).stem for p in query_paths.to_pylist()] if len(aps) <= MAX_AP_NAMES else []
    out = [
        "<h2 id='pr'>Precision–recall</h2>",
        f"<figure><img alt='precision-recall curves' src='{_pr_figure(curves)}'></figure>",
        "<h2 id='per-query'>Per-query AP</h2>",
        f"<figure><img alt='per-query AP' src='{_ap_figure(aps, names, row_label(top))}'></figure>",
        f"<h2 id='queries'>Example queries ({html.escape(row_label(top))})</h2>",
        _grids(ranks, gt, aps, paths, query_paths, layout.dataset),
    ]
    tsne = None if vectors is None else _tsne_figure(vectors, gt, int(getattr(config, "seed", 0)))
    if tsne:
        out += ["<h2 id='tsne'>Embedding map</h2>", f"<figure><img alt='t-SNE map' src='{tsne}'></figure>"]
    return out


def write_report(layout: RunLayout, config: Any) -> Path:
    text = build_report(layout, config)
    with atomic_path(layout.report_html) as tmp:
        tmp.write_text(text)
    log.info("report: %s", layout.report_html)
    return layout.report_html
