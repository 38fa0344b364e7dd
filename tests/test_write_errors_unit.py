"""Each writer of the run directory under a real write error (a child process with a file-size limit,
so the kernel fails the write with EFBIG): ``WriteFailed`` naming the file, no temporary file left, the
previous complete version kept."""

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np, pyarrow as pa
    from embedpipe.storage.artifacts import save_npz
    from embedpipe.storage.contracts.errors import WriteFailed
    from embedpipe.storage.features import FeatureWriter, feature_schema, feature_table, write_part_table
    from embedpipe.storage.contracts.layout import write_json_atomic
    from embedpipe.storage.index_folder import save_version
    from embedpipe.workers.index import ann

    root = Path(sys.argv[1])
    x = np.random.default_rng(0).standard_normal((400, 64)).astype(np.float32)
    ids = [f"id{i}" for i in range(len(x))]
    table = feature_table(feature_schema(64), ids, ids, [1] * len(x), [1] * len(x), x)
    write_json_atomic(root / "manifest.json", {"v": 1})
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
    index = ann.build_index(x, "Flat", 0)
    ids_table = pa.table({"row": np.arange(len(x)), "id": ids, "path": ids})
    writers = {
        "json": lambda: write_json_atomic(root / "manifest.json", {"v": 2, "big": x.tolist()}),
        "part": lambda: write_part_table(root / "store", 0, 1, table),
        "npz": lambda: save_npz(root / "models" / "m.npz", {}, x=x),
        "index": lambda: save_version(root / "index", index, ids_table),
        "stream": lambda: FeatureWriter(root / "q", 64, 1, {}).write(0, ids, ids, [1] * 400, [1] * 400, x),
    }
    out = {}
    for name, write in writers.items():
        try:
            write()
            out[name] = "written"
        except WriteFailed as err:
            out[name] = str(err)
    print(json.dumps(out))
    """
)


def test_every_writer_fails_whole_and_cleanly(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for name, message in out.items():
        assert message.startswith("cannot write ") and "File too large" in message, (name, message)
        assert "\n" not in message
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"v": 1}  # the previous version
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["manifest.json"], left  # no temporary file, no half file, no unpublished version
