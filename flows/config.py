"""Building the run's Config (the schema is ``storage.contracts.config``).

Sources, later wins: preset YAML (``flows/presets/<name>.yaml``), a user YAML file, CLI flags, then
``--set section.key=value`` overrides.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

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
