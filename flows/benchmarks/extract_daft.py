"""The Daft peer of ``embedpipe bench extract``: run by the Python of Daft's own virtual environment
(Daft needs another pyarrow than ours), as ``python extract_daft.py SPEC.json``.

What a Daft user writes for batch embedding: a DataFrame of paths, Daft's own reader for the bytes
(``url.download()``), then a class UDF (``@daft.cls``, loaded once per instance) whose batch method decodes
each image as the pipeline does (``decode_image``) and runs the eager channels-last torch model
(``EagerModel``) on it. SPEC names the images, the extract settings, threads, batch size and instances, and
where to write the descriptors (.npy, rows in the order of the paths, descriptors side by side) and the
timing (JSON). The clock starts when the DataFrame is built, after the imports, and includes the model
load, as the bench's other sides do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run(spec: dict) -> dict:
    import daft
    import numpy as np
    import pyarrow
    from daft import DataType

    from embedpipe.storage.contracts.config import ExtractConfig
    from embedpipe.workers.extract.eager import EagerModel
    from embedpipe.workers.ingest.decode import decode_image

    names, dims = spec["descriptors"], spec["dims"]
    total = sum(dims[name] for name in names)

    @daft.cls(max_concurrency=spec["instances"])
    class Embed:
        def __init__(self, extract: dict, threads: int, stack: int, max_pixels: int):
            self.cfg = ExtractConfig.model_validate(extract)
            self.model = EagerModel(self.cfg, threads, channels_last=True, stack=stack)
            self.max_pixels = max_pixels

        @daft.method.batch(
            return_dtype=DataType.embedding(DataType.float32(), total), batch_size=spec["batch_size"]
        )
        def __call__(self, data: daft.Series) -> np.ndarray:
            images = [decode_image(b, self.cfg.max_side, self.max_pixels)[0] for b in data.to_pylist()]
            vectors = self.model.embed_many(images)
            return np.concatenate([vectors[name] for name in names], axis=1)

    paths = spec["paths"]
    start = time.perf_counter()
    df = daft.from_pydict({"pos": list(range(len(paths))), "path": paths})
    df = df.with_column("data", df["path"].download())
    embed = Embed(spec["extract"], spec["threads"], spec["stack"], spec["max_pixels"])
    df = df.select("pos", embed(df["data"]).alias("vector"))
    result = df.to_pydict()
    seconds = time.perf_counter() - start
    order = np.argsort(np.asarray(result["pos"]))
    vectors = np.stack([np.asarray(result["vector"][i], np.float32) for i in order])
    np.save(spec["out_npy"], vectors)
    return {
        "time_s": round(seconds, 3),
        "images": len(result["pos"]),
        "positions_match": [int(result["pos"][i]) for i in order] == list(range(len(paths))),
        "versions": {"daft": daft.__version__, "pyarrow": pyarrow.__version__},
        "instances": spec["instances"],
        "threads": spec["threads"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    # the heavy imports before the clock, as the other sides have theirs imported
    import daft  # noqa: F401
    import torch  # noqa: F401

    Path(spec["out_json"]).write_text(json.dumps(run(spec), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
