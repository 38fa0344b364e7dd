"""The embedded demo dataset: Copydays/Holidays-style, built from photographs that ship in pip packages.

Each query photo (scikit-image, scikit-learn sample images) becomes a query plus six transformed copies
(crop, rotation, scale, strong JPEG, colour jitter, blur; seeded); other photos give distractors.
Written in the INRIA Holidays layout: ``NNNNNN.jpg``, query <=> imno % 100 == 0, group = imno // 100,
so the demo runs the same code path as the real benchmark. Deterministic: same seed, same bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

GENERATOR_VERSION = 2
MAX_SIDE = 800
QUERY_PHOTOS = (
    ("skimage", "astronaut.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "retina.jpg"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)
DISTRACTOR_PHOTOS = (
    ("skimage", "camera.png"),
    ("skimage", "coins.png"),
    ("skimage", "moon.png"),
    ("skimage", "page.png"),
    ("skimage", "text.png"),
    ("skimage", "horse.png"),
    ("skimage", "clock_motion.png"),
    ("skimage", "cell.png"),
    ("skimage", "microaneurysms.png"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
)
CROPS_PER_DISTRACTOR = 3
TRANSFORMS = ("crop", "rotate", "scale", "jpeg", "colour", "blur")


@dataclass(frozen=True)
class DemoInfo:
    root: Path
    n_images: int
    n_queries: int


# A second, disjoint collection for evaluating what was fine-tuned on the demo dataset: photographs and
# pictures that the demo generator does not use (matplotlib's and dask.distributed's sample images too).
# motorcycle_right is the other view of the demo's motorcycle_left stereo pair: the same scene, a
# different photograph; per-query APs in the report show its group apart.
EVAL_QUERY_PHOTOS = (
    ("matplotlib", "grace_hopper.jpg"),
    ("skimage", "motorcycle_right.png"),
)
EVAL_DISTRACTOR_PHOTOS = (
    ("skimage", "logo.png"),
    ("skimage", "color.png"),
    ("skimage", "chessboard_RGB.png"),
    ("skimage", "phantom.png"),
    ("matplotlib", "logo2.png"),
    ("matplotlib", "Minduka_Present_Blue_Pack.png"),
    ("distributed", "python.png"),
    ("distributed", "numpy.png"),
)
# each eval query photo gets the six transforms, then six pairs of them applied in turn (harder copies)
EVAL_COMPOUND = (
    ("crop", "colour"),
    ("rotate", "blur"),
    ("scale", "jpeg"),
    ("crop", "blur"),
    ("rotate", "colour"),
    ("scale", "colour"),
)
EVAL_FACES = 60  # plus this many faces of scikit-image's LFW subset as distractors (portraits look alike)


def _photo_path(package: str, name: str) -> Path:
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name
    if package == "distributed":  # found without importing it (and dask with it): an engine package
        import importlib.util

        spec = importlib.util.find_spec("distributed")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("No module named 'distributed'", name="distributed")
        return Path(spec.origin).parent / "http" / "static" / "images" / name
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / name
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def load_photo(package: str, name: str) -> Image.Image:
    """A bundled photograph as RGB, longer side at most ``MAX_SIDE``."""
    with Image.open(_photo_path(package, name)) as img:
        img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def _random_crop(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(lo, hi)
    cw, ch = max(16, int(w * frac)), max(16, int(h * frac))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def transform(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One Copydays-style attack, strong enough that descriptors differ in how many copies they find.
    Returns the image and the JPEG quality to save it with."""
    if kind == "crop":
        return _random_crop(img, rng, 0.4, 0.6), 90
    if kind == "rotate":
        angle = float(rng.choice([-1, 1]) * rng.uniform(15, 30))
        rotated = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
        w, h = img.size
        return rotated.crop((w // 6, h // 6, w - w // 6, h - h // 6)), 90
    if kind == "scale":
        f = rng.uniform(0.12, 0.25)
        size = (max(16, int(img.width * f)), max(16, int(img.height * f)))
        return img.resize(size, Image.Resampling.BICUBIC), 90
    if kind == "jpeg":
        return img, int(rng.integers(3, 7))
    if kind == "colour":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.0, 2.0)), 90
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(4.0, 7.0)))), 90
    raise ValueError(f"unknown transform {kind}")


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def generate_demo(root: Path, seed: int = 0) -> DemoInfo:
    """Write the demo dataset under ``root`` (skipped when an identical one is already there)."""
    return _generate(root, seed, "demo", QUERY_PHOTOS, DISTRACTOR_PHOTOS)


def generate_eval(root: Path, seed: int = 0) -> DemoInfo:
    """Write the evaluation collection under ``root``: the demo's layout and transforms on photos the demo
    does not use (``EVAL_QUERY_PHOTOS``, ``EVAL_DISTRACTOR_PHOTOS``), for testing a backbone fine-tuned on
    the demo dataset on images it never saw."""
    return _generate(root, seed, "eval", EVAL_QUERY_PHOTOS, EVAL_DISTRACTOR_PHOTOS, EVAL_COMPOUND, EVAL_FACES)


# A larger collection in the same layout, for what needs more vectors than the demo has (training 8-bit PQ
# sub-quantizers: 256 centroids each): the demo's and the evaluation collection's query photos in the six
# transforms (12 groups), LARGE_CROPS crops of every distractor photo of both, and LARGE_FACES LFW faces.
LARGE_CROPS = 16
LARGE_FACES = 100


def generate_large(root: Path, seed: int = 0, crops: int = LARGE_CROPS) -> DemoInfo:
    """Write the larger collection under ``root`` (12 queries, 184 + 20 x ``crops`` images: 504 by
    default; see ``LARGE_CROPS``). More crops make a collection of any size for timing (``bench
    reindex``): each crop is a distinct image of its own."""
    return _generate(
        root,
        seed,
        "large" if crops == LARGE_CROPS else f"large-{crops}",
        QUERY_PHOTOS + EVAL_QUERY_PHOTOS,
        DISTRACTOR_PHOTOS + EVAL_DISTRACTOR_PHOTOS,
        faces=LARGE_FACES,
        crops=crops,
    )


def compound(img: Image.Image, kinds: tuple[str, ...], rng: np.random.Generator) -> tuple[Image.Image, int]:
    """Several ``transform``s in turn; saved with the lowest JPEG quality among them."""
    quality = 95
    for kind in kinds:
        img, q = transform(img, kind, rng)
        quality = min(quality, q)
    return img, quality


def _faces(n: int) -> list[Image.Image]:
    """The first ``n`` faces of scikit-image's LFW subset (25x25 grey), as 100x100 RGB."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:n]  # (n, 25, 25) float in [0, 1]
    return [
        Image.fromarray((f * 255).round().astype(np.uint8))
        .convert("RGB")
        .resize((100, 100), Image.Resampling.BICUBIC)
        for f in faces
    ]


def _generate(
    root: Path,
    seed: int,
    kind: str,
    queries,
    distractors,
    compounds=(),
    faces: int = 0,
    crops: int = CROPS_PER_DISTRACTOR,
) -> DemoInfo:
    root = Path(root)
    stamp = root / ".demo.json"  # hidden: inputs are the visible files
    key = {"generator": GENERATOR_VERSION, "seed": seed}
    if kind != "demo":
        key["collection"] = kind
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        info = json.loads(stamp.read_text())
        return DemoInfo(root, info["n_images"], info["n_queries"])
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for g, (package, name) in enumerate(queries):
        photo = load_photo(package, name)
        base = 100000 + 100 * g
        files[f"{base:06d}.jpg"] = _jpeg_bytes(photo, 95)
        rng = np.random.default_rng([seed, g] if kind == "demo" else [seed, g, 7])
        for k, kinds in enumerate([(t,) for t in TRANSFORMS] + list(compounds), start=1):
            copy, quality = compound(photo, kinds, rng)
            files[f"{base + k:06d}.jpg"] = _jpeg_bytes(copy, quality)
    for d, (package, name) in enumerate(distractors):
        photo = load_photo(package, name)
        rng = np.random.default_rng([seed, 1000 + d])
        for c in range(crops):
            imno = 200001 + 100 * (d * crops + c)  # imno % 100 == 1: never a query
            files[f"{imno:06d}.jpg"] = _jpeg_bytes(_random_crop(photo, rng, 0.6, 0.9), 90)
    first_face = 300001 + 100 * max(0, len(distractors) * crops - 1000)  # after the crops' numbers
    for f, face in enumerate(_faces(faces)):
        files[f"{first_face + 100 * f:06d}.jpg"] = _jpeg_bytes(face, 90)
    for old in root.glob("*.jpg"):
        if old.name not in files:
            old.unlink()
    for fname, data in files.items():
        (root / fname).write_bytes(data)
    n_queries = len(queries)
    stamp.write_text(
        json.dumps({"key": key, "n_images": len(files), "n_queries": n_queries}, indent=2) + "\n"
    )
    return DemoInfo(root, len(files), n_queries)


# colour photographs bundled with the packages, used at the resolution they are stored at
NATIVE_PHOTOS = (*QUERY_PHOTOS, ("skimage", "motorcycle_right.png"))
MOSAIC_WIDTH = 2000


def native_mosaics(root: Path, n: int, seed: int = 0, min_pixels: int = 1_500_000) -> list[Path]:
    """``n`` JPEGs (quality 92) of at least ``min_pixels`` pixels for benches that need real photos larger
    than the bundled ones, none of them upscaled: each is a mosaic ``MOSAIC_WIDTH`` wide of bundled colour
    photographs at their stored resolution, in rows of seeded random picks (mirrored at random), every
    photo of a row cropped to the row's lowest height and the last one at the right edge. The same ``seed``
    gives the same files; existing files are reused."""
    root.mkdir(parents=True, exist_ok=True)
    photos = []
    for package, name in NATIVE_PHOTOS:
        with Image.open(_photo_path(package, name)) as img:
            photos.append(img.convert("RGB"))
    out = []
    for i in range(n):
        path = root / f"mosaic-{seed}-{min_pixels}-{i:04d}.jpg"
        out.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        rows, height = [], 0
        while MOSAIC_WIDTH * height < min_pixels:
            row, width = [], 0
            while width < MOSAIC_WIDTH:
                photo = photos[int(rng.integers(len(photos)))]
                if rng.random() < 0.5:
                    photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                row.append(photo)
                width += photo.width
            low = min(p.height for p in row)
            canvas = Image.new("RGB", (MOSAIC_WIDTH, low))
            x = 0
            for photo in row:
                top = int(rng.integers(photo.height - low + 1))
                canvas.paste(photo.crop((0, top, min(photo.width, MOSAIC_WIDTH - x), top + low)), (x, 0))
                x += photo.width
            rows.append(canvas)
            height += low
        mosaic = Image.new("RGB", (MOSAIC_WIDTH, height))
        y = 0
        for row in rows:
            mosaic.paste(row, (0, y))
            y += row.height
        tmp = path.with_suffix(".tmp")
        mosaic.save(tmp, format="JPEG", quality=92)
        tmp.replace(path)
    return out
