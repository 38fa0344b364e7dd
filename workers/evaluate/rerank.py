"""Re-ranking by descriptor augmentation (pure numpy): αQE and DBA (Radenović et al., TPAMI 2018).

Both replace a vector by the similarity^α-weighted sum of itself and its k nearest database neighbours,
then L2-normalise. αQE does it for the queries, DBA for every database vector. The neighbours come
from the caller's search (``sims``, ``idx``: (n, k) best first), so the maths stays engine-free.
"""

from __future__ import annotations

import numpy as np

# rows expanded at a time: (rows, D) float64 temporaries stay in cache-sized blocks instead of
# (n, D) arrays; the bytes are the same (each row's sums are unchanged)
EXPANSION_ROWS = 2048


def weighted_expansion(
    x: np.ndarray, database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float, include_self: bool
) -> np.ndarray:
    """x'_i = normalise(x_i·[include_self] + Σ_j max(sims_ij, 0)^α · database[idx_ij]).

    x: (n, D); database: (N, D); sims, idx: (n, k), idx -1 for missing neighbours -> (n, D) float32."""
    valid = idx >= 0
    weights = np.where(valid, np.clip(sims, 0.0, None), 0.0) ** alpha
    weights = np.where(valid, weights, 0.0).astype(np.float64)
    safe = np.where(valid, idx, 0)
    out = np.empty((len(idx), database.shape[1]), np.float32)
    for a in range(0, len(idx), EXPANSION_ROWS):
        b = min(a + EXPANSION_ROWS, len(idx))
        acc = np.zeros((b - a, database.shape[1]))
        for j in range(idx.shape[1]):  # one gather per neighbour rank, never a (rows, k, D) array
            acc += weights[a:b, j, None] * database[safe[a:b, j]]
        if include_self:
            acc += x[a:b]
        norms = np.linalg.norm(acc, axis=1, keepdims=True)
        out[a:b] = acc / np.where(norms > 0, norms, 1.0)
    return out


def pair_similarities(x: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner products of each listed row with its listed neighbours: out[i, j] = x[rows[i]] · x[ids[i, j]].
    rows: (n,), ids: (n, k) valid positions in x -> (n, k) float32, computed in row blocks."""
    out = np.empty(ids.shape, np.float32)
    for a in range(0, len(rows), EXPANSION_ROWS):
        block = x[rows[a : a + EXPANSION_ROWS]]
        for j in range(ids.shape[1]):
            out[a : a + EXPANSION_ROWS, j] = np.einsum("nd,nd->n", block, x[ids[a : a + EXPANSION_ROWS, j]])
    return out


def alpha_qe(
    queries: np.ndarray, database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float
) -> np.ndarray:
    """αQE: each query plus its top-k database vectors weighted by similarity^α (query weight 1)."""
    return weighted_expansion(queries, database, sims, idx, alpha, include_self=True)


def dba(database: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    """DBA: each database vector replaced by the weighted sum over its k+1 nearest database vectors,
    which include itself (similarity 1); ``sims``/``idx`` come from searching the database with itself."""
    return weighted_expansion(database, database, sims, idx, alpha, include_self=False)


def merge_neighbours(
    sims_a: np.ndarray, idx_a: np.ndarray, sims_b: np.ndarray, idx_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of two disjoint candidate lists (e.g. a row's neighbours among old rows and
    among new ones): similarity descending, ties by id ascending; -1 ids (pads) last.
    (n, ka) and (n, kb) -> (n, k) similarities (float32) and ids (int64)."""
    idx = np.concatenate([idx_a, idx_b], axis=1).astype(np.int64)
    sims = np.where(idx >= 0, np.concatenate([sims_a, sims_b], axis=1), -np.inf).astype(np.float32)
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def drop_excluded(
    sims: np.ndarray, idx: np.ndarray, exclude: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, remove the neighbours listed in ``exclude[i]`` (e.g. the query itself when it is in the
    database) and keep the first k of the rest; rows short of k are padded with idx -1."""
    out_s = np.zeros((len(idx), k), dtype=np.float32)
    out_i = np.full((len(idx), k), -1, dtype=np.int64)
    for i in range(len(idx)):
        keep = ~np.isin(idx[i], exclude[i]) & (idx[i] >= 0)
        s, j = sims[i][keep][:k], idx[i][keep][:k]
        out_s[i, : len(j)], out_i[i, : len(j)] = s, j
    return out_s, out_i


def word_matches(
    words_a: np.ndarray, words_b: np.ndarray, max_per_word: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tentative correspondences between two images: every pair of keypoints sharing a visual word,
    skipping words that occur more than ``max_per_word`` times in either image (bursts carry little
    geometry and many false pairs). words_a: (n_a,), words_b: (n_b,) -> (ia, ib), each (n_matches,),
    ordered by word, then occurrence in a, then in b."""
    ua, ca = np.unique(words_a, return_counts=True)
    ub, cb = np.unique(words_b, return_counts=True)
    _, ja, jb = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    keep = (ca[ja] <= max_per_word) & (cb[jb] <= max_per_word)
    ja, jb = ja[keep], jb[keep]
    order_a, order_b = np.argsort(words_a, kind="stable"), np.argsort(words_b, kind="stable")
    start_a, start_b = np.cumsum(ca) - ca, np.cumsum(cb) - cb
    pairs = []
    for r in range(max_per_word):
        for s in range(max_per_word):
            ok = (ca[ja] > r) & (cb[jb] > s)
            pairs.append((ja[ok], order_a[start_a[ja[ok]] + r], order_b[start_b[jb[ok]] + s]))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    word = np.concatenate([p[0] for p in pairs])
    ia = np.concatenate([p[1] for p in pairs])
    ib = np.concatenate([p[2] for p in pairs])
    order = np.lexsort((ib, ia, word))
    return ia[order], ib[order]


def ransac_inliers(pts_a: np.ndarray, pts_b: np.ndarray, model: str, threshold: float) -> int:
    """Inliers of the affine transform (or homography) RANSAC fits to the correspondences
    pts_a[i] -> pts_b[i], (n, 2) each. OpenCV's RANSAC draws from a fixed-seed generator, so the
    count is deterministic. Fewer correspondences than the model needs give 0."""
    import cv2

    need = 3 if model == "affine" else 4
    if len(pts_a) < need:
        return 0
    src = np.ascontiguousarray(pts_a, np.float32).reshape(-1, 1, 2)
    dst = np.ascontiguousarray(pts_b, np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(0)
    if model == "affine":
        matrix, mask = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=2000, confidence=0.99
        )
    else:
        matrix, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=2000, confidence=0.99)
    return 0 if matrix is None or mask is None else int(mask.sum())


# hypotheses scored at a time: (rows, n) float32 temporaries stay small whatever the number of matches
HYPOTHESIS_ROWS = 256


def similarity_hypotheses(kp_a: np.ndarray, kp_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The similarity transform each correspondence kp_a[i] -> kp_b[i] implies on its own, from the two
    keypoints' positions, scales and orientations (OpenCV's angles, degrees, image axes): x_b = s·R(θ)·x_a + t
    with s = size_b / size_a, θ = angle_b - angle_a. kp_a, kp_b: (n, 4) x, y, size, angle ->
    (rows_x (n, 3), rows_y (n, 3)): x_b = rows_x[i] · (x_a, y_a, 1), y_b = rows_y[i] · (x_a, y_a, 1)."""
    s = kp_b[:, 2] / np.maximum(kp_a[:, 2], 1e-6)
    theta = np.deg2rad(kp_b[:, 3] - kp_a[:, 3])
    c, si = s * np.cos(theta), s * np.sin(theta)
    tx = kp_b[:, 0] - (c * kp_a[:, 0] - si * kp_a[:, 1])
    ty = kp_b[:, 1] - (si * kp_a[:, 0] + c * kp_a[:, 1])
    return np.stack([c, -si, tx], 1), np.stack([si, c, ty], 1)


def spatial_inliers(
    kp_a: np.ndarray,
    kp_b: np.ndarray,
    model: str,
    threshold: float,
    scale_tolerance: float,
    angle_tolerance: float,
    hypotheses: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fast spatial matching (Philbin et al., CVPR 2007) of tentative correspondences kp_a[i] -> kp_b[i],
    (n, 4) x, y, size, angle each.

    Every correspondence (at most ``hypotheses``, evenly spread, when there are more) proposes the
    similarity of ``similarity_hypotheses``; the others agree with it when they land within ``threshold``
    pixels and their own scale ratio and orientation change are within ``scale_tolerance`` (a factor) and
    ``angle_tolerance`` (degrees) of it. The hypothesis most agree with wins (the first on ties); then
    ``model`` (affine or homography) is fitted by least squares to its inliers and the inliers are counted
    again by position alone, twice at most, unless they shrink (local optimisation). No sampling: each
    hypothesis is tried, so a true transform is found even when most tentative matches are wrong (with a
    small vocabulary, most are), and the result is deterministic.

    -> (inlier indices into the correspondences, ascending; their squared reprojection errors)."""
    need = 3 if model == "affine" else 4
    n = len(kp_a)
    none = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n < need:
        return none
    kp_a, kp_b = np.asarray(kp_a, np.float32), np.asarray(kp_b, np.float32)
    rows_x, rows_y = similarity_hypotheses(kp_a, kp_b)
    log_scale = np.log(np.maximum(kp_b[:, 2], 1e-6) / np.maximum(kp_a[:, 2], 1e-6))
    theta = np.deg2rad(kp_b[:, 3] - kp_a[:, 3])
    turn = np.stack([np.cos(theta), np.sin(theta)], 1)  # cos of a difference of angles by one product
    src = np.stack([kp_a[:, 0], kp_a[:, 1], np.ones(n, np.float32)])  # (3, n)
    t2 = np.float32(threshold) ** 2
    max_ds, min_cos = np.float32(np.log(scale_tolerance)), np.float32(np.cos(np.deg2rad(angle_tolerance)))

    def agree(h: np.ndarray) -> np.ndarray:  # (len(h), n): correspondences agreeing with hypotheses h
        ex, ey = rows_x[h] @ src - kp_b[:, 0], rows_y[h] @ src - kp_b[:, 1]
        ok = ex * ex + ey * ey <= t2
        ok &= np.abs(log_scale[None] - log_scale[h, None]) <= max_ds
        ok &= turn[h] @ turn.T >= min_cos
        return ok

    tried = np.arange(n) if n <= hypotheses else np.linspace(0, n - 1, hypotheses).round().astype(np.int64)
    best, best_count = 0, -1
    for a in range(0, len(tried), HYPOTHESIS_ROWS):
        h = tried[a : a + HYPOTHESIS_ROWS]
        counts = agree(h).sum(axis=1)
        i = int(np.argmax(counts))
        if counts[i] > best_count:
            best, best_count = int(h[i]), int(counts[i])
    mask = agree(np.array([best]))[0]
    ex, ey = rows_x[best] @ src - kp_b[:, 0], rows_y[best] @ src - kp_b[:, 1]
    err = ex * ex + ey * ey
    for _ in range(2):
        if mask.sum() < need:
            break
        e = _refit_errors(kp_a[:, :2], kp_b[:, :2], mask, model)
        grown = e <= t2
        if grown.sum() < mask.sum():
            break
        mask, err = grown, e
    inliers = np.flatnonzero(mask)
    return inliers, err[inliers]


def _refit_errors(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, model: str) -> np.ndarray:
    """Squared reprojection errors of every correspondence under ``model`` fitted by least squares to the
    ``mask``-ed ones. src, dst: (n, 2) -> (n,) float32."""
    import cv2

    if model == "affine":
        ones = np.ones((len(src), 1), np.float64)
        x = np.concatenate([src.astype(np.float64), ones], 1)
        matrix = np.linalg.lstsq(x[mask], dst[mask].astype(np.float64), rcond=None)[0]  # (3, 2)
        proj = x @ matrix
    else:
        matrix, _ = cv2.findHomography(src[mask], dst[mask], 0)
        if matrix is None:
            return np.full(len(src), np.inf, np.float32)
        proj = cv2.perspectiveTransform(src.reshape(-1, 1, 2).astype(np.float64), matrix).reshape(-1, 2)
    return ((proj - dst) ** 2).sum(axis=1).astype(np.float32)


def one_to_one(ia: np.ndarray, ib: np.ndarray, inliers: np.ndarray, err: np.ndarray) -> int:
    """Inliers left when each keypoint of either image counts once: correspondences ``inliers`` (indices
    into ia, ib: keypoints of image a and b) taken by increasing error, one sharing a keypoint with an
    earlier one dropped."""
    order = inliers[np.argsort(err, kind="stable")]
    _, first_a = np.unique(ia[order], return_index=True)
    order = order[np.sort(first_a)]
    return len(np.unique(ib[order]))


def verified_inliers(
    kp_a: np.ndarray,
    kp_b: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    model: str,
    threshold: float,
    scale_tolerance: float,
    angle_tolerance: float,
    hypotheses: int,
) -> int:
    """One-to-one inliers of ``spatial_inliers`` on the word matches (ia, ib) between keypoints kp_a
    (n_a, 4) and kp_b (n_b, 4) (x, y, size, angle)."""
    inliers, err = spatial_inliers(
        kp_a[ia], kp_b[ib], model, threshold, scale_tolerance, angle_tolerance, hypotheses
    )
    return one_to_one(ia, ib, inliers, err)


def verified_order(ranks: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """Re-rank one query's results after spatial verification of its shortlist.

    ranks: (N,) database rows, best first; inliers: (S,) for ranks[:S]. Shortlisted results with at
    least ``min_inliers`` come first by inlier count (ties keep their order: the score is inliers plus
    the BoW similarity), then the rest of the shortlist and the tail in their original order -> (N,)."""
    s = len(inliers)
    verified = inliers >= min_inliers
    head = np.argsort(-np.where(verified, inliers, -1), kind="stable")
    head = np.concatenate([head[: verified.sum()], np.flatnonzero(~verified)])
    return np.concatenate([ranks[:s][head], ranks[s:]])
