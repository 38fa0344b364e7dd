"""The fine-tuning folder's own report: ``FT_DIR/report.html`` (loss curve, training collection and
config, the validation curve and the epoch kept, the mined pairs as verified views versus near-copies,
and, when runs evaluated with and without the adapted backbone are given, their mAP side by side)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from embedpipe.workers.train.finetune import NEAR_COPY_PX, NEAR_COPY_SHARE


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
        ("weights kept", kept_text(info)),
        ("image size", info["max_side"]),
        ("learned whitening", info.get("whitening") or "none"),
    ]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts]
    parts.append("</table>")
    parts += validation_section(info)
    parts += mining_section(training.get("mining", []))
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
            adapted = "off-the-shelf"
            if r["backbone"] == str(ft_dir.resolve()):
                adapted = "adapted" if info.get("adapted", True) else "base model kept by validation"
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


def kept_text(info: dict) -> str:
    """What the folder holds after validation, in a few words (also in a run's report)."""
    val = info.get("validation")
    if not val:
        return "last epoch (no validation)"
    if info.get("adapted") is False:
        return f"base model kept: no epoch beat it on validation (mAP {val['base_map']:.4f})"
    return f"epoch {val['best_epoch']}: validation mAP {val['kept_map']:.4f} (base {val['base_map']:.4f})"


def validation_section(info: dict) -> list[str]:
    """The validation curve: mAP per epoch (0: the base model as a default run uses it)."""
    val = info.get("validation")
    if not val:
        return []
    posts = [k for k in ("l2", "pcaw") if any(k in c for c in val["curve"])]
    parts = [
        "<h2 id='validation'>Validation</h2>",
        f"<p>Collection <code>{html.escape(str(val['images']))}</code> ({html.escape(val['protocol'])}); "
        f"the epoch is picked by the {html.escape(val['post'] or 'l2')} mAP; an epoch is kept only when it "
        "beats the base model both as a default run uses it and at the fine-tuning image size. "
        f"Kept: {html.escape(kept_text(info))}.</p>",
        "<table><tr><th>epoch</th>" + "".join(f"<th>GeM {p} mAP</th>" for p in posts) + "<th></th></tr>",
    ]
    for c in val["curve"]:
        mark = "kept" if c["epoch"] == val["best_epoch"] else ""
        name = "0 (base, as a default run)" if c["epoch"] == 0 else str(c["epoch"])
        cells = [name, *[_fmt(c.get(p)) for p in posts], mark]
        parts.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
        if c["epoch"] == 0 and "map_at_size" in c:
            size = info["training"]["config"]["max_side"]
            cells = [
                f"0 (base at {size} px, the fine-tuning size)",
                *[_fmt(c.get(f"{p}_at_size")) for p in posts],
                "",
            ]
            parts.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    parts.append("</table>")
    return parts


def mining_section(mining: list[dict]) -> list[str]:
    """Mined pairs per epoch (mining without labels): verified views versus near-copies."""
    if not mining:
        return []
    parts = [
        "<h2 id='mining'>Mined pairs</h2><p>A verified pair is a <b>near-copy</b> when a similarity "
        f"transform (rotation, uniform scale, translation) within {NEAR_COPY_PX:g} pixels explains at "
        f"least {NEAR_COPY_SHARE:.0%} of the inliers of the verification model: a crop, rotation, "
        "rescaling or recompression of one photo. "
        "Otherwise it is a <b>view</b>: the scene from another viewpoint.</p>",
        "<table><tr><th>epoch</th><th>verified pairs</th><th>views</th><th>near-copies</th></tr>",
    ]
    for m in mining:
        cells = [m["epoch"], m["verified_pairs"], m["views"], m["near_copies"]]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    return parts


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"
