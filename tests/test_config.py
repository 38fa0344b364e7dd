import pytest
from pydantic import ValidationError

from embedpipe.flows.config import load_config, preset_names
from embedpipe.storage.contracts.config import Config
from embedpipe.storage.contracts.errors import InputError


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
