import io

import numpy as np
import pytest
from PIL import Image

from embedpipe.storage.errors import DecodeError
from embedpipe.workers.decode import content_id, decode_image


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


def test_content_id_is_sha256():
    assert content_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_query_crop_keeps_the_database_scale(photo):
    from embedpipe.workers.decode import decode_query_crop

    full = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = full.size
    box = (10, 20, 210, 170)
    out = decode_query_crop(photo, 256, box)
    factor = 256 / max(w, h)
    assert out.shape == (round(150 * factor), round(200 * factor), 3)
    ref = np.asarray(full.crop(box).resize((out.shape[1], out.shape[0]), Image.Resampling.BICUBIC))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 1.0
    assert decode_query_crop(photo, 4096, box).shape == (150, 200, 3)  # never upscaled
    with pytest.raises(DecodeError, match="outside"):
        decode_query_crop(photo, 256, (w + 5, 0, w + 50, 10))
