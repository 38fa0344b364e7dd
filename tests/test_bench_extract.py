"""The pieces of ``embedpipe bench extract`` its CLI test does not reach: the eager peer model gives the
pipeline's descriptors, the Ray Data peer is sized so its stages cannot starve each other, and the default
photos are real, large, distinct and made the same way each time."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from embedpipe.flows.benchmarks.common import PHOTO_ASPECTS, PHOTO_MIN_PIXELS, package_photos
from embedpipe.storage.contracts.config import ExtractConfig
from embedpipe.storage.contracts.errors import InputError
from embedpipe.workers.engines.ray_data import peer_pool
from embedpipe.workers.ingest.decode import decode_image

from .helpers import embedpipe


@pytest.fixture
def photos(demo_images):
    """Real photos of the demo dataset decoded to at most 160 px and cropped to three shapes, two of them
    of one shape."""
    files = sorted(demo_images.glob("*.jpg"))[:3]
    images = [decode_image(p.read_bytes(), 160)[0][:96, : 96 + 16 * i].copy() for i, p in enumerate(files)]
    return [*images, np.ascontiguousarray(images[0][:, ::-1])]


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_model_gives_the_pipeline_descriptors(photos, channels_last):
    from embedpipe.workers.extract.eager import EagerModel
    from embedpipe.workers.extract.embed import Embedder

    cfg = ExtractConfig(descriptors=("gem", "spoc", "mac"), max_side=160)
    eager = EagerModel(cfg, threads=2, channels_last=channels_last, stack=8)
    got = eager.embed_many(photos)
    assert eager.forwards == 3  # the two images of one shape went through one forward pass
    ours = Embedder(cfg, threads=2).embed_many(photos)
    for name in cfg.descriptors:
        assert got[name].shape == (len(photos), eager.dims()[name]) and got[name].dtype == np.float32
        for i, vectors in enumerate(ours):
            a, b = got[name][i], vectors[name]
            assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.9999, (name, i)
    # a different image gives a different descriptor: the check above can fail
    assert float(got["gem"][0] @ got["gem"][1]) < 0.999


@pytest.mark.parametrize(
    "cpus, actors, actor_cpus, threads",
    [(1, 1, 1, 1), (2, 1, 1, 2), (4, 1, 3, 4), (8, 2, 3, 4), (16, 4, 3, 4)],
)
def test_ray_data_peer_leaves_a_cpu_to_decode(cpus, actors, actor_cpus, threads):
    pool = peer_pool(cpus)
    assert (pool.actors, pool.actor_cpus, pool.threads) == (actors, actor_cpus, threads)
    if cpus > 1:
        assert pool.actors * pool.actor_cpus <= cpus - 1


def test_default_photos_are_large_distinct_crops_of_real_photos():
    try:
        folder, info = package_photos(4, seed=3)
    except InputError as err:
        pytest.skip(str(err))
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 4 and info["n"] == 4 and info["package"].startswith("mate-backgrounds_")
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 4
    for f in files:
        with Image.open(f) as img:
            assert img.width * img.height >= PHOTO_MIN_PIXELS
            assert any(img.width * b == img.height * a for a, b in PHOTO_ASPECTS), img.size
    assert info["megapixels_min"] >= PHOTO_MIN_PIXELS / 1e6
    # made once: asked again, the same folder and files
    assert package_photos(4, seed=3) == (folder, info)
    assert sorted(folder.glob("*.jpg")) == files


def test_unknown_peer_is_a_usage_error():
    out = embedpipe("bench", "extract", "--peers", "eager,spark", "--images", ".")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "embedpipe: error: --peers: unknown peer 'spark' (known: eager, ray_data, daft)"
    ]
