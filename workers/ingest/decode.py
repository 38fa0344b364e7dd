"""Image decode and downscale with clear errors for bad inputs.

JPEGs are decoded at a reduced DCT scale when the target is at most half the stored size
(``Image.draft``), then resized with a bicubic filter so the longer side is at most ``max_side``.
Images are never upscaled.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedpipe.storage.contracts.errors import DecodeError


def content_id(data: bytes) -> str:
    """Content-hash id of an input: hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit integer greys scaled to their range (not clipped),
    transparency composited on white, CMYK/YCbCr/LAB/palette/greyscale converted."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


_CLOCKWISE = {
    90: Image.Transpose.ROTATE_270,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: bytes, max_side: int, max_pixels: int = 89_478_485, exif: bool = True, rotate: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``data`` to an RGB uint8 array (H, W, 3) with longer side <= ``max_side``.

    Returns the array and the original (width, height) after orientation: the EXIF Orientation tag's
    (unless ``exif`` is false), then ``rotate`` degrees clockwise (a multiple of 90). Animated images give
    their first frame. Raises ``DecodeError`` with a one-line reason for empty, truncated, corrupt or
    non-image data, and for images of more than ``max_pixels`` pixels (decompression bombs), which are
    refused from their header before any pixel is decoded.
    """
    img, size = decode_pil(data, max_side, max_pixels, exif, rotate)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise DecodeError(f"unusable pixel data of shape {array.shape}")
    return np.ascontiguousarray(array), size


def decode_pil(
    data: bytes, max_side: int, max_pixels: int = 89_478_485, exif: bool = True, rotate: int = 0
) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image`` as a loaded RGB PIL image (the same pixels), for callers that encode it again."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: refused below with our own reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = img = Image.open(io.BytesIO(data))
        with opened:
            if img.width * img.height > max_pixels:
                raise DecodeError(
                    f"image too large: {img.width}x{img.height} = {img.width * img.height} pixels "
                    f"(limit ingest.max_pixels = {max_pixels})"
                )
            rotated = exif and img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            width, height = (img.height, img.width) if rotated else img.size
            tw, th = target_size(width, height, max_side)
            if img.format == "JPEG":
                # DCT-domain downscale; draft() sees the stored orientation and keeps both sides >= request.
                img.draft("RGB", (th, tw) if rotated else (tw, th))
            img.load()
            if exif:
                ImageOps.exif_transpose(img, in_place=True)
            img = to_rgb(img)
            if img.size != (tw, th):
                img = img.resize((tw, th), Image.Resampling.BICUBIC)
            elif img is opened:  # closed when the block ends
                img = img.copy()
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise DecodeError(f"image too large: {err}") from None
    except MemoryError as err:
        raise DecodeError(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DecodeError(f"truncated or corrupt image: {err}") from None
    if img.width == 0 or img.height == 0:
        raise DecodeError(f"unusable pixel data of size {img.size}")
    if rotate % 360:  # clockwise
        img = img.transpose(_CLOCKWISE[rotate % 360])
        width, height = (height, width) if rotate % 180 else (width, height)
    return img, (width, height)


def decode_query_crop(
    data: bytes,
    max_side: int,
    bbox: tuple[float, float, float, float],
    max_pixels: int = 89_478_485,
    exif: bool = True,
) -> tuple[np.ndarray, tuple[int, int]]:
    """A query as the Oxford/Paris protocols define it: crop the bounding box (x1, y1, x2, y2, in the
    original image's pixels) from the full-resolution image, then resize the crop by the factor the whole
    image gets (longer side to ``max_side``, never up), so the query has the scale of the database images."""
    full, (width, height) = decode_image(data, 1 << 30, max_pixels, exif)  # full resolution
    x1, y1, x2, y2 = (int(round(v)) for v in bbox)
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(width, x2), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise DecodeError(f"query box {tuple(bbox)} is outside the {width}x{height} image")
    crop = Image.fromarray(full[y1:y2, x1:x2])
    factor = min(1.0, max_side / max(width, height))
    size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
    return np.asarray(crop.resize(size, Image.Resampling.BICUBIC) if factor < 1.0 else crop), (width, height)


# quality of the JPEG an input is stored as when it has to be re-encoded (``stored_bytes``)
JPEG_QUALITY = 95


def stored_bytes(
    data: bytes, max_side: int, max_pixels: int = 89_478_485, exif: bool = True, rotate: int = 0
) -> tuple[bytes, str, tuple[int, int]]:
    """What the ingest stage stores for an input: its original bytes when it fits ``max_side`` and needs
    no turning (EXIF applied at decode, no ``rotate``), else its decoded pixels as a JPEG of
    ``JPEG_QUALITY`` (no ICC profile, comment or EXIF carried over). -> (bytes, extension, (width,
    height)); ``DecodeError`` for an unusable input."""
    image, (width, height) = decode_pil(data, max_side, max_pixels, exif, rotate)
    if max(width, height) <= max_side and exif and not rotate:
        return data, _extension(data), (width, height)
    buf = io.BytesIO()
    image.info = {}
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), "jpg", (width, height)


def _extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt or "bin")
