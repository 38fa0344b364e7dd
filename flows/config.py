"""Building the run's Config (the schema is ``storage.contracts.config``).

Sources, later wins: preset YAML (``flows/presets/<name>.yaml``), a user YAML file, CLI flags, then
``--set section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.index.ann import check_index_config


def preset_names() -> list[str]:
    folder = resources.files("embedpipe.flows") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{origin}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping of config keys")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_set(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {assignment!r}: expected key=value, e.g. extract.max_side=512")
    value = yaml.safe_load(raw) if raw.strip() else None
    node: dict[str, Any] = {}
    nested = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nested[part] = {}
        nested = nested[part]
    nested[parts[-1]] = value
    return _merge(data, node)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'{more}"
    return f"bad config value for '{where}': {first['msg']}{more}"


def load_config(
    preset: str | None = None,
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Build the run's Config; every problem becomes one ``InputError`` line."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in preset_names():
            raise InputError(f"unknown preset '{preset}' (known: {', '.join(preset_names())})")
        text = (resources.files("embedpipe.flows") / "presets" / f"{preset}.yaml").read_text()
        data = _merge(data, _read_yaml(text, f"preset {preset}"))
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"config file not found: {path}")
        data = _merge(data, _read_yaml(Path(path).read_text(), str(path)))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    for assignment in sets or []:
        data = _apply_set(data, assignment)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise InputError(_one_line(err)) from None
    check_index_config(cfg.index)
    return cfg


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable; ``args.sets``, read by ``load_config``)."""
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set extract.max_side=512 (repeatable)",
    )


def add_set_arguments(p: argparse.ArgumentParser) -> None:
    """``--set``, ``--ray-address``, ``--dask-address`` (read by ``load_config`` and ``engine_overrides``)."""
    add_set_argument(p)
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument(
        "--dask-address",
        help="run the fit stage's Dask jobs on this running Dask scheduler (e.g. tcp://host:8786)",
    )


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--preset``, ``--out`` and the ``add_set_arguments`` flags (read by ``config_from_args``)."""
    p.add_argument("--preset", help="named preset (see 'embedpipe presets')")
    p.add_argument("--out", type=Path, help="run directory; re-running with the same one resumes")
    add_set_arguments(p)


def engine_overrides(args: argparse.Namespace) -> dict:
    """Config overrides of --ray-address and --dask-address."""
    overrides: dict = {}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
    if args.dask_address:
        overrides["fit"] = {"scheduler": "distributed", "dask_address": args.dask_address}
    return overrides


def config_from_args(args: argparse.Namespace, check_inputs: bool = True) -> Config:
    """The Config of a command that runs the pipeline on ``--images`` (run, deploy, benches): the preset
    (or 'default' without a config file), the file, the flags, then ``--set``; then the checks that need
    no engine: the inputs list, the rotations file, the backbone, not the fine-tuning collection."""
    from embedpipe.workers.descriptors.backbones import check_backbone
    from embedpipe.workers.ingest.plan import run_listings
    from embedpipe.workers.ingest.sources import list_inputs, read_rotations, remote_shard_limits

    overrides = {
        "images": getattr(args, "images", None),
        "protocol": getattr(args, "protocol", None),
        "ground_truth": getattr(args, "ground_truth", None),
        "distractors": getattr(args, "distractors", None),
        "out": args.out,
    }
    overrides.update(engine_overrides(args))
    if getattr(args, "backbone", None):
        overrides["extract"] = backbone_overrides(args.backbone)
    cfg = load_config(
        preset=args.preset or ("default" if not getattr(args, "config", None) else None),
        path=getattr(args, "config", None),
        overrides=overrides,
        sets=args.sets,
    )
    if cfg.images is not None and check_inputs:
        with run_listings(cfg.out), remote_shard_limits(cfg.ingest.timeout_s, cfg.ingest.retries):
            list_inputs(cfg.images)  # fail fast, before any engine starts
            if cfg.distractors:
                list_inputs(cfg.distractors)
    if cfg.ingest.rotations:
        read_rotations(cfg.ingest.rotations)
    check_backbone(cfg.extract.backbone, cfg.extract.weights, cfg.extract.descriptors)
    check_not_training_set(cfg)
    return cfg


def check_not_training_set(cfg) -> None:
    """A fine-tuned backbone is never evaluated on the collection it was trained on."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    if cfg.images is None or not is_finetuned(cfg.extract.backbone):
        return
    trained = read_finetuned(cfg.extract.backbone)["training"]["images"]
    if str(Path(trained).resolve()) == str(Path(cfg.images).resolve()):
        raise InputError(
            f"{cfg.images} is the training collection of {cfg.extract.backbone}: evaluate on other images"
        )
    info = read_finetuned(cfg.extract.backbone)
    if info.get("adapted") is False:
        logging.getLogger("embedpipe").info(
            "%s: fine-tuning did not beat the base model on validation; using the base model %s",
            cfg.extract.backbone,
            info["base"],
        )
    validated = (info.get("validation") or {}).get("images")
    if validated and str(Path(validated).resolve()) == str(Path(cfg.images).resolve()):
        logging.getLogger("embedpipe").warning(
            "%s is the validation collection of %s (it chose the epoch kept): its mAP here is optimistic",
            cfg.images,
            cfg.extract.backbone,
        )


def backbone_overrides(name: str) -> dict:
    """``--backbone``: the name, and for a fine-tuned folder the image size it was trained at
    (``--set extract.max_side=…`` still wins)."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    if is_finetuned(name):
        return {"backbone": str(Path(name).resolve()), "max_side": read_finetuned(name)["max_side"]}
    return {"backbone": name}


def config_yaml(cfg: Config) -> str:
    """The effective config as YAML, in the schema's order (``embedpipe config show``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _type_name(annotation: Any) -> str:
    """A field's type as a reader says it: ``int``, ``Path or null``, ``one of a, b``, ``list of ...``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return (
            f"list of ({_type_name(args[0])})"
            if get_origin(args[0]) is Literal
            else f"list of {_type_name(args[0])}"
        )
    return getattr(annotation, "__name__", str(annotation))


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, default=str)}`"


def config_docs() -> str:
    """``docs/configuration.md``: every key of the schema with its type, default and description."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config schema (`storage/contracts/config.py`) by `embedpipe config docs`;",
        "a test fails when this page and the schema differ. Set a key in a YAML file",
        "(`embedpipe run CONFIG.yaml`), with a preset (`--preset NAME`, see `embedpipe presets`) or on",
        "the command line (`--set section.key=value`); later sources win. `embedpipe config show` prints",
        "the effective config.",
    ]
    top = [(name, f) for name, f in Config.model_fields.items() if not _is_section(f.annotation)]
    sections = [(name, f) for name, f in Config.model_fields.items() if _is_section(f.annotation)]
    lines += ["", "## Top level", "", *_table(top, "")]
    for name, field in sections:
        model = field.annotation
        lines += ["", f"## `{name}`", ""]
        if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
            lines += [" ".join(model.__doc__.split()), ""]
        lines += _table(list(model.model_fields.items()), f"{name}.")
    return "\n".join(lines) + "\n"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _table(fields: list, prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields:
        description = " ".join((field.description or "").split())
        for char, escaped in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;")):
            description = description.replace(char, escaped)
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {type_name} | {_default(field.default)} | {description} |")
    return rows
