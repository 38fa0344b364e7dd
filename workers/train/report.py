"""The fine-tuning folder's own report: ``FT_DIR/report.html`` (loss curve, training collection and
config, and, when runs evaluated with and without the adapted backbone are given, their mAP side by side)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def loss_curve_png(history: list[dict]) -> bytes | None:
    """PNG of the loss per step and its per-epoch mean; None without matplotlib or history."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(history) + 1), [h["loss"] for h in history], lw=1, color="#888", label="step")
    epochs = sorted({h["epoch"] for h in history})
    ends, means = [], []
    for e in epochs:
        steps = [i + 1 for i, h in enumerate(history) if h["epoch"] == e]
        ends.append(steps[-1])
        means.append(sum(history[i - 1]["loss"] for i in steps) / len(steps))
    ax.plot(ends, means, "o-", color="#c33", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def comparison_rows(runs: dict[str, Path]) -> list[dict]:
    """Rows ``{"run", "backbone", "descriptor", "post", "map", "mp@10"}`` of finished runs (no re-ranking)."""
    rows = []
    for label, run in runs.items():
        metrics = json.loads((Path(run) / "report" / "metrics.json").read_text())
        for r in metrics["results"]:
            if r.get("rerank", "none") == "none":
                rows.append(
                    {
                        "run": label,
                        "images": metrics["dataset"]["path"],
                        "backbone": r.get("backbone"),
                        "descriptor": r["descriptor"],
                        "post": r["post"],
                        "map": r.get("map"),
                        "mp@10": r.get("mp@10"),
                    }
                )
    return rows


def write_finetune_report(ft_dir: Path, runs: dict[str, Path] | None = None) -> Path:
    """Write ``ft_dir/report.html``; ``runs`` maps a label to a finished run directory to compare."""
    ft_dir = Path(ft_dir)
    info = json.loads((ft_dir / "backbone.json").read_text())
    history = json.loads((ft_dir / "train_log.json").read_text())
    training = info["training"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>embedpipe finetune</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}</style>",
        f"<h1>Fine-tuned backbone: {html.escape(str(ft_dir))}</h1>",
        "<table>",
    ]
    facts = [
        ("training collection", training["images"]),
        ("images", training["n_images"]),
        ("positives", "labels / Holidays groups" if training["positives"] == "labels" else "mined, verified"),
        ("base backbone", info["base"]),
        ("head", f"{info['head']}" + (f" (learnt p = {info['gem_p']:.3f})" if info.get("gem_p") else "")),
        ("loss", f"{training['config']['loss']} (margin {training['config']['margin']})"),
        ("epochs", training["epochs"]),
        ("image size", info["max_side"]),
        ("learned whitening", info.get("whitening") or "none"),
    ]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts]
    parts.append("</table>")
    png = loss_curve_png(history)
    if png:
        parts.append(
            f"<h2>Training loss</h2><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    if runs:
        rows = comparison_rows(runs)
        parts.append("<h2>Retrieval: off-the-shelf vs adapted</h2><table>")
        parts.append(
            "<tr><th>run</th><th>evaluation collection</th><th>backbone</th><th>descriptor</th><th>post</th>"
            "<th>mAP</th><th>mP@10</th></tr>"
        )
        for r in rows:
            adapted = "adapted" if r["backbone"] == str(ft_dir.resolve()) else "off-the-shelf"
            cells = [r["run"], r["images"], f"{r['backbone']} ({adapted})", r["descriptor"], r["post"]]
            cells += [_fmt(r["map"]), _fmt(r["mp@10"])]
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append(f"<h2>Config</h2><pre>{html.escape(json.dumps(training['config'], indent=2))}</pre>")
    out = ft_dir / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(out)
    return out


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"
