import json
import os
import pickle

import numpy as np
import pytest

from embedpipe.storage.contracts.errors import InputError
from embedpipe.storage.groundtruth import load_pickle_safely
from embedpipe.workers.evaluate.eval_ranks import eval_ranks
from embedpipe.workers.evaluate.metrics import ns_score

from .helpers import embedpipe
from .revisitop_reference import revisitop_compute_map


def _revisitop_gnd(rng, n_db=80, nq=12):
    gnd = []
    for _ in range(nq):
        rows = rng.permutation(n_db)
        e, h, j = rng.integers(0, 6), rng.integers(0, 6), rng.integers(0, 5)
        gnd.append(
            {
                "bbx": [0.0, 0.0, 10.0, 10.0],
                "easy": rows[:e].tolist(),
                "hard": rows[e : e + h],
                "junk": rows[e + h : e + h + j],
            }
        )
    gnd[0]["easy"], gnd[0]["hard"] = [], np.array([], dtype=np.int64)  # a query with no positive at all
    return {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": [f"q{i}" for i in range(nq)], "gnd": gnd}


def _revisitop_example_evaluate(ranks_db_q, gnd):
    """revisitop's example_evaluate: easy / medium / hard built from the same gnd."""
    out = {}
    for name, ok, junk in [
        ("easy", ["easy"], ["junk", "hard"]),
        ("medium", ["easy", "hard"], ["junk"]),
        ("hard", ["hard"], ["junk", "easy"]),
    ]:
        gnd_t = [
            {
                "ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]),
                "junk": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk]),
            }
            for g in gnd
        ]
        m, pr = revisitop_compute_map(ranks_db_q, gnd_t, [1, 5, 10])
        out[name] = {"map": m, "mp@1": pr[0], "mp@5": pr[1], "mp@10": pr[2]}
    return out


@pytest.mark.parametrize("n_ranked", [80, 50])
def test_roxford_matches_revisitop(tmp_path, n_ranked):
    rng = np.random.default_rng(n_ranked)
    data = _revisitop_gnd(rng)
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(data, f)
    ranks = np.stack([rng.permutation(80)[:n_ranked] for _ in range(12)])
    if n_ranked < 80:  # every query keeps at least one positive in the truncated list (revisitop needs it)
        for i, g in enumerate(data["gnd"][1:], start=1):
            for k in ("easy", "hard"):
                if len(g[k]):
                    ranks[i, -1] = np.asarray(g[k])[0]
    ours = eval_ranks("roxford5k", tmp_path / "gnd_roxford5k.pkl", ranks)
    ref = _revisitop_example_evaluate(ranks.T.copy(), data["gnd"])
    for setup in ("easy", "medium", "hard"):
        for key, value in ref[setup].items():
            assert ours[setup][key] == pytest.approx(value, abs=1e-9), (setup, key)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"gnd": [Evil()]}))
    with pytest.raises(InputError, match="not allowed"):
        load_pickle_safely(tmp_path / "evil.pkl")
    arrays = {"gnd": [{"ok": np.arange(3), "junk": np.array([7])}], "imlist": ["a"] * 9}
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(arrays))
    assert np.array_equal(load_pickle_safely(tmp_path / "ok.pkl")["gnd"][0]["ok"], np.arange(3))


def test_classic_oxford(tmp_path):
    data = {"imlist": [str(i) for i in range(6)], "gnd": [{"ok": [3, 5], "junk": [0], "bbx": [0, 0, 1, 1]}]}
    (tmp_path / "gnd_oxford5k.pkl").write_bytes(pickle.dumps(data))
    out = eval_ranks("oxford5k", tmp_path / "gnd_oxford5k.pkl", np.array([[0, 3, 1, 5, 2, 4]]))
    assert out["map"] == pytest.approx((1 + 1) / 2 / 2 + (1 / 2 + 2 / 3) / 2 / 2)
    with pytest.raises(InputError, match="easy/hard/junk"):
        eval_ranks("roxford5k", tmp_path / "gnd_oxford5k.pkl", np.array([[0, 3, 1, 5, 2, 4]]))
    with pytest.raises(InputError, match="outside"):
        eval_ranks("oxford5k", tmp_path / "gnd_oxford5k.pkl", np.array([[0, 3, 1, 5, 2, 9]]))
    with pytest.raises(InputError, match="rows"):
        eval_ranks("oxford5k", tmp_path / "gnd_oxford5k.pkl", np.zeros((2, 6), dtype=int))


def test_ukbench_ns_score():
    groups = np.repeat(np.arange(3), 4)
    perfect = np.stack(
        [
            np.concatenate(
                [
                    [i],
                    [j for j in range(12) if groups[j] == groups[i] and j != i],
                    [j for j in range(12) if groups[j] != groups[i]],
                ]
            )
            for i in range(12)
        ]
    )
    assert ns_score(perfect, groups) == 4.0
    shifted = np.roll(perfect, 2, axis=1)  # two non-members now lead every list
    assert ns_score(shifted, groups) == pytest.approx(2.0)


def test_eval_ranks_cli_holidays(tmp_path):
    names = ["100000.jpg", "100001.jpg", "100100.jpg", "100101.jpg", "100102.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    np.save(tmp_path / "ranks.npy", np.array([[0, 1, 2, 3, 4], [2, 0, 3, 1, 4]]))
    cmd = [
        "eval-ranks",
        "--protocol",
        "holidays",
        "--gnd",
        str(tmp_path / "list.txt"),
        "--ranks",
        str(tmp_path / "ranks.npy"),
        "--json",
        str(tmp_path / "o.json"),
    ]
    out = embedpipe(*cmd)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "o.json").read_text())
    # query 0: its copy first -> AP 1. Query 2: without itself the list is [0, 3, 1, 4], its copies
    # (3 and 4) sit at ranks 1 and 3 -> (0/1 + 1/2)/2/2 + (1/3 + 2/4)/2/2 = 1/3
    q2 = (0 / 1 + 1 / 2) / 2 / 2 + (1 / 3 + 2 / 4) / 2 / 2
    assert result["map"] == pytest.approx((1.0 + q2) / 2)
    bad = embedpipe(*cmd[:-4], "--ranks", tmp_path / "list.txt")
    assert bad.returncode == 2 and bad.stderr.startswith("embedpipe: error:")
