"""`embedpipe bench WHAT`: one sub-command per bench module, each with only its own flags; the modules
stay cheap to import (every `embedpipe` call builds them all); the result JSON is stamped."""

import argparse
import datetime
import importlib
import json
import subprocess
import sys

import pytest

from embedpipe.flows.benchmarks import BENCHES
from embedpipe.flows.benchmarks.common import write_result
from embedpipe.flows.cli import build_parser

from .helpers import embedpipe

CONFIG_FLAGS = {"--preset", "--out", "--set", "--ray-address", "--dask-address"}
# flags only some benches take: the benches that take each one
OWN = {
    "--sweep": {"extract"},
    "--peers": {"extract"},
    "--components": {"pca"},
    "--factory": {"index"},
    "--growth": {"index"},
    "--rows": {"pca", "index", "scale"},
    "--dim": {"pca", "index", "scale"},
    "--parts": {"pca", "index"},
    "--store": {"pca", "index"},
    "--fraction": {"reindex"},
    "--held-back": {"reindex"},
    "--steps": {"train"},
    "--max-side": {"ingest", "runtimes"},
    "--backbone": {"runtimes"},
    "--threads": {"runtimes"},
    "--passes": {"runtimes"},
    "--only": {"runtimes"},
    "--demo": {"runtimes"},
    "--baseline-python": {"extract", "ingest", "index"},
    "--baseline": {"index"},
    "--budget-mb": {"index"},
    "--vectors": {"index"},
    "--queries": {"index"},
    "--n": {"extract", "decode", "ingest", "gpu"},
    "--batch": {"gpu"},
    "--side": {"gpu"},
    "--precision": {"gpu"},
    "--arch": {"gpu"},
    "--images": {"extract", "decode", "codebook", "reindex", "train", "ingest"},
    **{flag: {"extract", "decode", "codebook", "reindex", "train", "ingest"} for flag in CONFIG_FLAGS},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    return _subparsers(_subparsers(build_parser())["bench"])


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_one_sub_command_per_bench_in_order():
    assert list(BENCHES) == [
        "extract",
        "runtimes",
        "decode",
        "codebook",
        "pca",
        "index",
        "reindex",
        "train",
        "ingest",
        "gpu",
        "scale",
    ]
    assert list(_bench_parsers()) == list(BENCHES)
    for name in BENCHES:
        module = importlib.import_module(f"embedpipe.flows.benchmarks.{name}")
        assert callable(module.add_arguments) and callable(module.run), name


@pytest.mark.parametrize("what", list(BENCHES))
def test_each_bench_lists_only_its_own_flags(what):
    flags = _flags(_bench_parsers()[what])
    assert "--json" in flags
    for flag, benches in OWN.items():
        assert (flag in flags) == (what in benches), (what, flag)
    assert flags <= {"--json", *OWN}, flags - {"--json", *OWN}
    help_text = _bench_parsers()[what].format_help()
    assert f"usage: embedpipe bench {what}" in help_text
    assert all(flag in help_text for flag in flags)


def test_bench_defaults_are_per_bench():
    parse = build_parser().parse_args
    pca, index = parse(["bench", "pca"]), parse(["bench", "index"])
    assert (pca.rows, pca.dim, pca.parts, pca.components) == (1_000_000, 256, 16, 128)
    # index: --rows/--dim default per mode (1,000,000 x 128 for the fill, 200,000 x 256 with --baseline)
    assert (index.rows, index.dim, index.factory, index.growth) == (None, None, "IVF1024,PQ32", "")
    reindex = parse(["bench", "reindex"])
    assert (reindex.fraction, reindex.held_back, reindex.sets) == (0.1, "spread", [])
    scale = parse(["bench", "scale"])
    assert (scale.rows, scale.dim) == ([200_000, 2_000_000], 256)
    assert parse(["bench", "ingest"]).max_side == 512 and parse(["bench", "extract"]).n == 200


def test_flags_of_another_bench_and_unknown_benches_exit_2(capsys):
    for argv in (["bench", "pca", "--sweep", "1"], ["bench", "nope"], ["bench"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2, argv
    out = embedpipe("bench", "nope", ephemeral=True)
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr


def test_building_every_bench_imports_no_engine():
    """`embedpipe --help` builds every bench's sub-command: no torch, Ray, Prefect, Dask or sklearn."""
    code = (
        "import sys; from embedpipe.flows.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'prefect', 'dask', 'sklearn', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_write_result_stamps_date_and_machine(tmp_path, capsys):
    path = tmp_path / "deeper" / "bench.json"
    stamped = write_result({"name": "x", "ratio": 1.5}, path, echo=False)
    assert capsys.readouterr().out == ""
    written = json.loads(path.read_text())
    assert written == stamped and written["name"] == "x" and written["ratio"] == 1.5
    assert written["date"] in {
        (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=m)).strftime("%Y-%m-%d")
        for m in (0, 5)
    }
    machine = written["machine"]
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert "numpy" in machine["versions"]
    echoed = write_result({"name": "y"}, None)
    assert json.loads(capsys.readouterr().out) == echoed and echoed["name"] == "y"


def test_bench_train_refuses_sides_that_took_different_steps():
    from embedpipe.flows.benchmarks.train import same_steps
    from embedpipe.storage.contracts.errors import RunFailed

    assert same_steps([0.5, 0.25], [0.5, 0.25 * (1 + 5e-4)]) < 1e-3
    with pytest.raises(RunFailed, match="did not take the same steps"):
        same_steps([0.5, 0.25], [0.5, 0.26])
    with pytest.raises(RunFailed):
        same_steps([0.5], [0.5, 0.25])
