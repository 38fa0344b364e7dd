"""Classical descriptors on decoded pixels (OpenCV; no engine imports).

Local features: SIFT, RootSIFT (Arandjelović & Zisserman, CVPR 2012) and ORB, detected on the grayscale
image, keypoints sorted deterministically (response, then position, size, angle) and capped. SIFT
descriptors are stored as the uint8 values OpenCV computes; RootSIFT is derived from them when read, so
one SIFT store serves both. ORB descriptors are 32 bytes (256 bits).

Global: HOG (Dalal & Triggs; scikit-image, OpenCV 5 dropped its HOG) of the whole image: resized to a
fixed square (``grid``), or aspect kept with fixed-size cells whose blocks sit centred on a fixed canvas
(``dalal-triggs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from embedpipe.storage.contracts.config import LocalConfig

LOCAL_FEATURES = ("sift", "rootsift", "orb")
STORED_FEATURE = {"sift": "sift", "rootsift": "sift", "orb": "orb"}  # feature -> store it is read from
STORED_DIM = {"sift": 128, "orb": 32}  # bytes per stored descriptor
HOG_DIM = 7 * 7 * 4 * 9  # 7x7 blocks of 2x2 cells over an 8x8 cell grid, 9 bins
ENCODINGS = ("bow", "vlad", "fv", "temb")  # descriptors encoded from a local-feature store: <encoding>-<f>


@dataclass(frozen=True)
class LocalFeatures:
    """One image's local features: ``keypoints`` (n, 4) float32 x, y, size, angle; ``descriptors``
    (n, STORED_DIM) uint8."""

    keypoints: np.ndarray
    descriptors: np.ndarray


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _detector(stored: str, cap: int):
    if stored == "orb":
        # ORB keeps its best `nfeatures` by Harris score; ask for more so our own cap decides
        return cv2.ORB_create(nfeatures=max(2 * cap, 500))
    return cv2.SIFT_create()


def keypoint_order(kp: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Indices sorting keypoints by response (descending), then x, y, size, angle: a total order, so the
    cap keeps the same keypoints whatever order the detector's threads produced them in.

    kp: (n, 4) x, y, size, angle; response: (n,) -> (n,) int."""
    return np.lexsort((kp[:, 3], kp[:, 2], kp[:, 1], kp[:, 0], -response))


def _as_array(keypoints) -> tuple[np.ndarray, np.ndarray]:
    kp = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], np.float32).reshape(-1, 4)
    response = np.array([k.response for k in keypoints], np.float32)
    return kp, response


def extract_local(gray: np.ndarray, stored: str, cap: int) -> LocalFeatures:
    """Detect, sort, cap at ``cap`` keypoints, describe. ``stored``: 'sift' or 'orb'."""
    det = _detector(stored, cap)
    found = det.detect(gray, None)
    kp, response = _as_array(found)
    keep = keypoint_order(kp, response)[:cap]
    chosen = [found[i] for i in keep]
    if not chosen:
        return LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, STORED_DIM[stored]), np.uint8))
    described, desc = det.compute(gray, chosen)
    kp, _ = _as_array(described)
    if desc is None:
        desc = np.zeros((0, STORED_DIM[stored]), np.uint8)
    # OpenCV's SIFT descriptors are integers in [0, 255] held as float32: uint8 is lossless
    desc = np.clip(np.rint(desc), 0, 255).astype(np.uint8) if stored == "sift" else desc.astype(np.uint8)
    return LocalFeatures(kp, np.ascontiguousarray(desc))


def descriptor_vectors(stored: np.ndarray, feature: str) -> np.ndarray:
    """Stored uint8 descriptors -> float32 vectors for k-means and assignment.

    sift: as is (n, 128); rootsift: L1-normalise then square root (n, 128), so Euclidean distance
    between them is the Hellinger kernel on SIFT; orb: bits unpacked to 0/1 (n, 256), so squared
    Euclidean distance is the Hamming distance."""
    x = stored.astype(np.float32)
    if feature == "rootsift":
        x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-12)
        return np.sqrt(x)
    if feature == "orb":
        return np.unpackbits(stored, axis=1).astype(np.float32)
    return x


def hog_descriptor(rgb: np.ndarray, size: int) -> np.ndarray:
    """HOG of the whole image resized to ``size`` x ``size`` (grayscale; scikit-image): an 8x8 grid of
    cells, blocks of 2x2 cells with a one-cell stride, 9 orientation bins, L2-Hys per block; the result
    L2-normalised. (H, W, 3) uint8 -> (HOG_DIM,) float32, whatever ``size`` (a multiple of 8)."""
    from skimage.feature import hog

    cell = size // 8
    small = cv2.resize(grayscale(rgb), (size, size), interpolation=cv2.INTER_AREA)
    v = hog(
        small, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), block_norm="L2-Hys"
    ).astype(np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def hog_dalal_triggs_dim(size: int, cell: int, block: int, bins: int) -> int:
    """Length of ``hog_dalal_triggs``: the blocks of a ``size``² canvas of ``cell``-pixel cells."""
    blocks = size // cell - block + 1
    return blocks * blocks * block * block * bins


def hog_dalal_triggs(rgb: np.ndarray, size: int, cell: int = 8, block: int = 2, bins: int = 9) -> np.ndarray:
    """Dalal-Triggs HOG with the aspect ratio kept (grayscale; scikit-image): the longer side resized to
    ``size`` and each side rounded to whole ``cell``-pixel cells (at least one block), blocks of
    ``block``² cells with a one-cell stride, ``bins`` unsigned orientations, L2-Hys per block.

    A retrieval descriptor needs one length whatever the aspect, so the blocks are placed centred on the
    block grid of a fixed ``size`` x ``size`` canvas and the rest of the canvas is zeros: padding that
    adds no gradient and contributes nothing to a dot product (a square image fills the canvas). The
    result is L2-normalised. (H, W, 3) uint8 -> (``hog_dalal_triggs_dim``,) float32."""
    from skimage.feature import hog

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    cells = [min(size // cell, max(block, round(side * scale / cell))) for side in (h, w)]
    small = cv2.resize(grayscale(rgb), (cells[1] * cell, cells[0] * cell), interpolation=cv2.INTER_AREA)
    blocks = hog(
        small,
        orientations=bins,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        feature_vector=False,
    )  # (rows, cols, block, block, bins)
    n = size // cell - block + 1
    canvas = np.zeros((n, n, block, block, bins), np.float32)
    top, left = (n - blocks.shape[0]) // 2, (n - blocks.shape[1]) // 2
    canvas[top : top + blocks.shape[0], left : left + blocks.shape[1]] = blocks
    v = canvas.reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def hog_dim(cfg: LocalConfig) -> int:
    """Length of the HOG vector ``cfg`` asks for: HOG_DIM (grid) or ``hog_dalal_triggs_dim``."""
    if cfg.hog_layout == "grid":
        return HOG_DIM
    return hog_dalal_triggs_dim(cfg.hog_size, cfg.hog_cell, cfg.hog_block, cfg.hog_bins)


def hog_of(rgb: np.ndarray, cfg: LocalConfig) -> np.ndarray:
    """The HOG vector of ``cfg.hog_layout``: ``hog_descriptor`` (grid) or ``hog_dalal_triggs``."""
    if cfg.hog_layout == "grid":
        return hog_descriptor(rgb, cfg.hog_size)
    return hog_dalal_triggs(rgb, cfg.hog_size, cfg.hog_cell, cfg.hog_block, cfg.hog_bins)


def is_classical(descriptor: str) -> bool:
    """Descriptors computed here rather than by a CNN: hog and <encoding>-<feature> (bow, vlad, fv, temb)."""
    return descriptor == "hog" or descriptor.startswith(tuple(f"{e}-" for e in ENCODINGS))


def encoding_of(descriptor: str) -> tuple[str, str]:
    """'bow-rootsift' -> ('bow', 'rootsift'); 'hog' -> ('hog', '')."""
    kind, _, feature = descriptor.partition("-")
    return kind, feature


def stored_features(descriptors: tuple[str, ...]) -> tuple[str, ...]:
    """The local-feature stores the bow-/vlad-/fv-/temb- descriptors need, in a fixed order."""
    needed = {STORED_FEATURE[encoding_of(d)[1]] for d in descriptors if is_classical(d) and d != "hog"}
    return tuple(f for f in ("sift", "orb") if f in needed)


def local_store(stored: str) -> str:
    """Name of a local-feature store under ``features/``."""
    return f"local-{stored}"
