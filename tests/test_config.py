from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from embedpipe.flows.config import config_docs, load_config, preset_names
from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import InputError

from .helpers import embedpipe


def test_presets_load():
    assert {"default", "demo"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(preset=name), Config)


def test_layering_and_set():
    cfg = load_config(
        preset="demo",
        overrides={"out": "/tmp/x"},
        sets=["extract.max_side=512", "extract.descriptors=[gem, mac]", "fit.whiten=false"],
    )
    assert cfg.extract.max_side == 512 and cfg.extract.descriptors == ("gem", "mac")
    assert not cfg.fit.whiten and str(cfg.out) == "/tmp/x"


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["extract.max_sid=512"], "unknown config key 'extract.max_sid'"),
        (["extract.max_side=tiny"], "bad config value for 'extract.max_side'"),
        (["extract.descriptors=[gem, gem]"], "without repeats"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_config_is_one_line(sets, message):
    with pytest.raises(InputError, match=message) as err:
        load_config(sets=sets)
    assert "\n" not in str(err.value)


def test_bad_preset_and_file(tmp_path):
    with pytest.raises(InputError, match="unknown preset"):
        load_config(preset="nope")
    bad = tmp_path / "c.yaml"
    bad.write_text("extract: [1, 2\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(path=bad)


def test_fingerprint_tracks_sections():
    a, b = load_config(), load_config(sets=["fit.dim=32"])
    assert a.fingerprint("extract") == b.fingerprint("extract")
    assert a.fingerprint("fit") != b.fingerprint("fit")


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_configuration_page_is_generated_from_the_schema():
    """docs/configuration.md is what `embedpipe config docs` writes: regenerate it when the schema changes."""
    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert page == config_docs(), (
        "docs/configuration.md is stale: run `embedpipe config docs --out docs/configuration.md`"
    )
    keys = _keys(Config)
    assert len(keys) > 80
    for key in keys:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert not row.endswith("|  |"), f"{key} has no description in the schema"


def test_config_show_prints_the_effective_config_as_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extract:\n  max_side: 640\nfit:\n  dim: 32\n")
    out = embedpipe("config", "show", path, "--preset", "demo", "--set", "fit.dim=16", "--set", "seed=7")
    assert out.returncode == 0, out.stderr
    shown = Config.model_validate(yaml.safe_load(out.stdout))
    want = load_config(preset="demo", path=path, sets=["fit.dim=16", "seed=7"])
    assert shown == want and shown.extract.max_side == 640 and shown.fit.dim == 16 and shown.seed == 7
    default = embedpipe("config", "show")
    assert Config.model_validate(yaml.safe_load(default.stdout)) == load_config(preset="default")
    bad = embedpipe("config", "show", "--set", "extract.max_sid=1")
    assert (
        bad.returncode == 2 and bad.stderr.strip() == "embedpipe: error: unknown config key 'extract.max_sid'"
    )
