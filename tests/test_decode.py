import io

import numpy as np
import pytest
from PIL import Image

from embedpipe.storage.contracts.errors import DecodeError
from embedpipe.workers.ingest.decode import content_id, decode_image


def _encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def photo(demo_images):
    return (demo_images / "100100.jpg").read_bytes()  # chelsea the cat


def test_downscale_keeps_aspect_and_never_upscales(photo):
    w, h = Image.open(io.BytesIO(photo)).size
    small, orig = decode_image(photo, 128)
    assert orig == (w, h) and max(small.shape[:2]) == 128 and small.dtype == np.uint8
    assert small.shape[1] / small.shape[0] == pytest.approx(w / h, rel=0.02)
    full, _ = decode_image(photo, 4096)
    assert full.shape[:2] == (h, w)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "truncated or corrupt|not an image"),
    ],
)
def test_bad_inputs_raise_one_line(data, reason):
    with pytest.raises(DecodeError, match=reason) as err:
        decode_image(data, 256)
    assert "\n" not in str(err.value)


def test_truncated_jpeg(photo):
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_image(photo[: len(photo) // 3], 256)


def test_modes_become_rgb():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    for img, fmt in [
        (rgb.convert("L"), "PNG"),
        (rgb.convert("P"), "PNG"),
        (rgb.convert("RGBA"), "PNG"),
        (rgb.convert("CMYK"), "JPEG"),
        (rgb.convert("I;16"), "PNG"),
    ]:
        out, size = decode_image(_encode(img, fmt), 100)
        assert out.shape == (40, 60, 3) and size == (60, 40), img.mode


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    out, size = decode_image(_encode(img, exif=exif.tobytes()), 30)
    assert size == (40, 60) and out.shape == (30, 20, 3)


def test_orientation_options(photo, tmp_path):
    upright = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    turned = _encode(Image.fromarray(np.rot90(upright)), "PNG")  # stored 90° counter-clockwise
    big = max(upright.shape)
    out, size = decode_image(turned, big, rotate=90)  # turned back clockwise, at full size: lossless
    assert np.array_equal(out, upright) and size == (upright.shape[1], upright.shape[0])
    small, _ = decode_image(turned, 128, rotate=90)
    assert small.shape[:2] == decode_image(_encode(Image.fromarray(upright), "PNG"), 128)[0].shape[:2]
    for degrees, k in ((180, 2), (270, 1)):
        assert np.array_equal(decode_image(_encode(Image.fromarray(upright), "PNG"), big, rotate=degrees)[0],
                              np.rot90(upright, k=-k if degrees == 180 else k))  # fmt: skip
    # EXIF orientation can be ignored: the pixels as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _encode(Image.new("RGB", (60, 40), (255, 0, 0)), exif=exif.tobytes())
    assert decode_image(tagged, 30, exif=False)[0].shape == (20, 30, 3)
    assert decode_image(tagged, 30, exif=False, rotate=90)[0].shape == (30, 20, 3)


def test_rotation_lists(tmp_path):
    from embedpipe.storage.contracts.errors import InputError
    from embedpipe.workers.ingest.sources import read_rotations, rotation_of

    good = tmp_path / "rot.csv"
    good.write_text(
        "name,degrees\n100100.jpg,90\n# a comment\n\n/x/y/100200.jpg -90  # trailing\n100300\t180\n"
    )
    table = read_rotations(good)
    assert table == {"100100.jpg": 90, "100200.jpg": 270, "100300": 180}
    assert rotation_of("/data/holidays/100100.jpg", table) == 90
    assert rotation_of("/s/shard-00001.tar/100300.jpg", table) == 180  # by stem
    assert rotation_of("http://h/100200.jpg?x=1", table) == 270 and rotation_of("/a/b.jpg", table) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("100100.jpg 90\n100200.jpg 45\n")
    with pytest.raises(InputError, match="bad.txt, line 2: expected 'name degrees'"):
        read_rotations(bad)
    with pytest.raises(InputError, match="rotations list .*missing"):
        read_rotations(tmp_path / "missing.txt")


def test_content_id_is_sha256():
    assert content_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_query_crop_keeps_the_database_scale(photo):
    from embedpipe.workers.ingest.decode import decode_query_crop

    full = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = full.size
    box = (10, 20, 210, 170)
    out, size = decode_query_crop(photo, 256, box)
    assert size == (w, h)
    factor = 256 / max(w, h)
    assert out.shape == (round(150 * factor), round(200 * factor), 3)
    ref = np.asarray(full.crop(box).resize((out.shape[1], out.shape[0]), Image.Resampling.BICUBIC))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 1.0
    assert decode_query_crop(photo, 4096, box)[0].shape == (150, 200, 3)  # never upscaled
    with pytest.raises(DecodeError, match="outside"):
        decode_query_crop(photo, 256, (w + 5, 0, w + 50, 10))


def test_pixel_values_survive_every_mode():
    """Not just the shape: 16-bit greys are scaled (not clipped), alpha is composited on white, palette
    transparency honoured, animated images give their first frame, every common format decodes."""
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64512 in 16 bits
    out, _ = decode_image(_encode(Image.fromarray(ramp), "PNG"), 64)
    assert np.array_equal(out[..., 0], np.round(ramp * (255 / 65535)).astype(np.uint8))
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 5, 10))
    out, _ = decode_image(_encode(rgba, "PNG"), 64)
    assert out[0, 0].tolist() == [200, 10, 10] and out[0, 9].tolist() == [255, 255, 255]
    pal = rgba.convert("RGB").convert("P")
    pal.info["transparency"] = pal.getpixel((9, 0))
    out, _ = decode_image(_encode(pal, "PNG", transparency=pal.getpixel((9, 0))), 64)
    assert out[0, 9].tolist() == [255, 255, 255]
    frames = [Image.new("RGB", (12, 12), c) for c in ((0, 0, 255), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out, _ = decode_image(buf.getvalue(), 64)
    assert out[0, 0].tolist() == [0, 0, 255]
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for fmt, kw in [("WEBP", {"lossless": True}), ("TIFF", {}), ("BMP", {}), ("PNG", {}), ("PPM", {})]:
        out, size = decode_image(_encode(rgb, fmt, **kw), 64)
        assert size == (50, 30) and np.array_equal(out, np.asarray(rgb)), fmt


def test_decompression_bomb_is_refused_from_the_header():
    bomb = _encode(Image.new("1", (12000, 12000)), "PNG")  # 144 Mpx in a few hundred kB
    assert len(bomb) < 1_000_000
    with pytest.raises(DecodeError, match=r"image too large: 12000x12000 .*ingest.max_pixels"):
        decode_image(bomb, 256)
    small = _encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(small, 256, max_pixels=50_000)
    assert decode_image(small, 256, max_pixels=60_000)[1] == (300, 200)


def test_bench_decode_compares_both_paths_on_the_same_files(tmp_path):
    from embedpipe.flows.benchmarks.decode import bench_decode, naive_decode
    from embedpipe.flows.config import load_config
    from embedpipe.workers.ingest.demo_data import MOSAIC_WIDTH, native_mosaics

    files = native_mosaics(tmp_path, 3, seed=1)
    assert [f.read_bytes() for f in files] == [
        f.read_bytes() for f in native_mosaics(tmp_path / "b", 3, seed=1)
    ]
    for f in files:  # real photos at their stored size: at least 1.5 megapixels, nothing upscaled
        assert Image.open(f).width == MOSAIC_WIDTH and Image.open(f).height * MOSAIC_WIDTH >= 1_500_000
    cfg = load_config(sets=["extract.max_side=256", "extract.descriptors=[gem]"])
    data = files[0].read_bytes()
    assert naive_decode(data, 256).shape == decode_image(data, 256)[0].shape
    result = bench_decode(files, cfg, repeats=1, n_cosine=2)
    assert (
        result["name"] == "decode" and result["n_images"] == 3 and result["source_megapixels"]["min"] >= 1.5
    )
    assert result["ratio"] == pytest.approx(result["baseline"]["time_s"] / result["ours"]["time_s"], rel=1e-3)
    assert 0.9 < result["cosine"]["min"] <= result["cosine"]["mean"] <= 1.0 + 1e-6
    same, fine = result["simplejpeg"]["same_scale"], result["simplejpeg"]["fine_scale"]
    assert (
        same["same_pixels"] and same["time_s"] > 0 and fine["time_s"] > 0 and result["simplejpeg"]["n"] == 3
    )
    assert 0.9 < fine["cosine"]["min"] <= fine["cosine"]["mean"] <= 1.0 + 1e-6


def test_ingest_turns_listed_images_and_keeps_the_others(tmp_path, photo):
    from embedpipe.flows.config import load_config
    from embedpipe.workers.engines.ray_stages import _columns, input_items
    from embedpipe.workers.ingest.sources import list_inputs
    from embedpipe.workers.ingest.stage import ingest_batch

    (tmp_path / "a.jpg").write_bytes(photo)
    (tmp_path / "b.jpg").write_bytes(photo)
    (tmp_path / "rot.txt").write_text("b.jpg 90\n")
    cfg = load_config(preset="default", sets=[f"ingest.rotations={tmp_path / 'rot.txt'}"])
    items = input_items(
        [*list_inputs(tmp_path / "a.jpg").refs, *list_inputs(tmp_path / "b.jpg").refs], ingest=cfg.ingest
    )
    assert [it["rotate"] for it in items] == [0, 90]
    out = ingest_batch(_columns(items), 4096, cfg.ingest)
    assert out["payload"][0] == photo  # small enough and not turned: the original bytes
    with Image.open(io.BytesIO(photo)) as img, Image.open(io.BytesIO(out["payload"][1])) as turned:
        assert turned.size == (img.height, img.width) and (out["width"][1], out["height"][1]) == turned.size


def test_corrupt_jpeg_and_pixel_limit(photo):
    """A truncated or corrupt JPEG is one line; the pixel limit is checked before decoding."""
    for bad in (photo[: len(photo) // 2], photo[:200] + b"\0" * 2000 + photo[2200:]):
        with pytest.raises(DecodeError, match="truncated or corrupt") as err:
            decode_image(bad, 256)
        assert "\n" not in str(err.value)
    w, h = Image.open(io.BytesIO(photo)).size
    with pytest.raises(DecodeError, match="ingest.max_pixels"):
        decode_image(photo, 256, max_pixels=w * h - 1)


def test_actor_decodes_one_batch_while_embedding_another(demo_images):
    """On small CPU nodes an actor runs two calls at once (one decoding while the other embeds, one forward
    at a time): the descriptors are those of the calls run one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from embedpipe.flows.config import load_config
    from embedpipe.storage.contracts.config import ExtractConfig
    from embedpipe.workers.engines.ray_stages import EmbedActor, _columns, input_items, pool_size

    assert pool_size(ExtractConfig(), 2).calls == 2 and pool_size(ExtractConfig(), 8).calls == 1
    assert pool_size(ExtractConfig(decode_in="stage"), 2).calls == 1
    cfg = load_config(sets=["extract.max_side=96", "extract.descriptors=[gem]"])
    paths = [str(p) for p in sorted(demo_images.rglob("*.jpg"))[:8]]
    batches = [_columns(input_items(paths[i : i + 2], ingest=cfg.ingest)) for i in range(0, 8, 2)]
    actor = EmbedActor(cfg.extract, 1, cfg.ingest)
    alone = [actor(b) for b in batches]
    with ThreadPoolExecutor(2) as calls:
        together = list(calls.map(actor, batches))
    for a, b in zip(alone, together, strict=True):
        assert list(a["pos"]) == list(b["pos"]) and not any(a["error"])
        assert np.array_equal(a["d_gem"], b["d_gem"])
