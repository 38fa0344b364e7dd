"""Real photographs of the same scenes from different viewpoints, for tests that need true multi-view
pairs (not edited copies of one photo): the example images of OpenCV's documentation package for
Debian (``opencv-doc``), fetched once with ``apt-get download`` and unpacked under the user's cache.

Tests that use them skip, with the reason, where the package cannot be fetched (no apt, no network).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from embedpipe.flows.benchmarks.common import debian_package
from embedpipe.storage.contracts.errors import InputError

PACKAGE = "opencv-doc"
DATA = Path("usr/share/doc/opencv-doc/examples/data")

# two photographs of one scene each, taken from different places (or times): aerial views, a street in
# Leuven, books on a floor, the Graffiti wall, a plant, a box in a cluttered scene, moving people,
# a toy scene
GROUPS: dict[str, tuple[str, ...]] = {
    "aero": ("aero1.jpg", "aero3.jpg"),
    "leuven": ("leuvenA.jpg", "leuvenB.jpg"),
    "books": ("left.jpg", "right.jpg"),
    "graffiti": ("graf1.png", "graf3.png"),
    "aloe": ("aloeL.jpg", "aloeR.jpg"),
    "box": ("box.png", "box_in_scene.png"),
    "basketball": ("basketball1.png", "basketball2.png"),
    "rubberwhale": ("rubberwhale1.png", "rubberwhale2.png"),
}
# single photographs of other scenes
DISTRACTORS = (
    "baboon.jpg",
    "fruits.jpg",
    "messi5.jpg",
    "home.jpg",
    "butterfly.jpg",
    "apple.jpg",
    "orange.jpg",
    "starry_night.jpg",
    "squirrel_cls.jpg",
    "building.jpg",
    "HappyFish.jpg",
    "board.jpg",
    "stuff.jpg",
    "smarties.png",
)


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embedpipe-tests" / PACKAGE


def opencv_examples() -> Path | None:
    """The unpacked example-data folder, fetched on first use; None when it cannot be fetched."""
    data = cache_root() / DATA
    if (data / "graf3.png").is_file():
        return data
    try:
        debian_package(PACKAGE, cache_root(), "the multi-view tests skip")
    except InputError:
        return None
    return data if (data / "graf3.png").is_file() else None


def holidays_collection(
    dest: Path, groups: list[str], distractors: tuple[str, ...] = (), source: Path | None = None
) -> Path:
    """Write ``groups`` (names of ``GROUPS``) and ``distractors`` in the INRIA Holidays layout as JPEGs:
    group g's first photo is query ``1{g:03d}00.jpg``, its other views follow; distractors are numbered
    so that none is a query (imno % 100 == 1)."""
    source = source or opencv_examples()
    if source is None:
        raise FileNotFoundError(f"the {PACKAGE} example photos could not be fetched")
    dest.mkdir(parents=True, exist_ok=True)
    for g, name in enumerate(groups):
        for v, fname in enumerate(GROUPS[name]):
            _save(source / fname, dest / f"{100000 + 100 * g + v:06d}.jpg")
    for d, fname in enumerate(distractors):
        _save(source / fname, dest / f"{200001 + 100 * d:06d}.jpg")
    return dest


def _save(src: Path, dst: Path) -> None:
    with Image.open(src) as img:
        img.convert("RGB").save(dst, quality=95)
