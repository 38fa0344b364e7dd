"""Fine-tuning maths for retrieval (pure torch/numpy, no engine): the network, the losses, the tuples.

Follows Radenović et al., "CNN image retrieval learns from BoW" (ECCV 2016) and its reference code
(cnnimageretrieval-pytorch):

* ``RetrievalNet``: a registry backbone's conv trunk, then GeM with a learnable exponent p (or R-MAC),
  then L2 normalisation. BatchNorm statistics stay frozen while training (``freeze_batchnorm``).
* losses over one tuple (query, positive, negatives...) of L2-normalised vectors, with d the Euclidean
  distance to the query:
  contrastive  ½·d(q, p)² + Σₙ ½·max(0, m − d(q, n))²
  triplet      Σₙ ½·max(0, m + d(q, p)² − d(q, n)²)
* tuples: for every image of a group of two or more (labels, or the Holidays layout's groups) a positive
  from its group and the hardest negatives of the current embedding, one per other group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch
from torch import Tensor, nn

from embedpipe.workers.descriptors.pooling import l2n, rmac
from embedpipe.workers.evaluate.protocols import holidays_imno

LOSSES = ("contrastive", "triplet")
HEADS = ("gem", "rmac")


# ---------------------------------------------------------------------------------------------- losses


def contrastive_loss(q: Tensor, pos: Tensor, negs: Tensor, margin: float) -> Tensor:
    """Contrastive loss of one tuple. q: (D,), pos: (D,), negs: (N, D) -> scalar."""
    d_pos = (q - pos).norm(p=2)
    d_neg = (q[None, :] - negs).norm(p=2, dim=1)  # (N,)
    return 0.5 * d_pos.pow(2) + 0.5 * (margin - d_neg).clamp(min=0).pow(2).sum()


def triplet_loss(q: Tensor, pos: Tensor, negs: Tensor, margin: float) -> Tensor:
    """Triplet loss of one tuple, summed over its negatives. q: (D,), pos: (D,), negs: (N, D) -> scalar."""
    d_pos2 = (q - pos).pow(2).sum()
    d_neg2 = (q[None, :] - negs).pow(2).sum(dim=1)  # (N,)
    return 0.5 * (margin + d_pos2 - d_neg2).clamp(min=0).sum()


def tuple_loss(name: str, vectors: Tensor, margin: float) -> Tensor:
    """``name`` loss of one tuple given as rows: query, positive, negatives. vectors: (2 + N, D) -> scalar."""
    if name == "contrastive":
        return contrastive_loss(vectors[0], vectors[1], vectors[2:], margin)
    if name == "triplet":
        return triplet_loss(vectors[0], vectors[1], vectors[2:], margin)
    raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})")


# --------------------------------------------------------------------------------------------- network


class GeM(nn.Module):
    """GeM pooling with a learnable exponent p (Radenović et al., TPAMI 2018). (B, C, H, W) -> (B, C)"""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class RMAC(nn.Module):
    """R-MAC head (3 levels, no parameters). (B, C, H, W) -> (B, C)"""

    def forward(self, x: Tensor) -> Tensor:
        return rmac(x)


class RetrievalNet(nn.Module):
    """Conv trunk + pooling head + L2: (B, 3, H, W) normalised pixels -> (B, C) unit vectors."""

    def __init__(self, trunk: nn.Module, head: str, gem_p: float = 3.0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head '{head}' (known: {', '.join(HEADS)})")
        self.trunk = trunk
        self.head = head
        self.pool = GeM(gem_p) if head == "gem" else RMAC()

    def forward(self, x: Tensor) -> Tensor:
        return l2n(self.pool(self.trunk(x).float()))

    def gem_p(self) -> float | None:
        return float(self.pool.p.detach()) if isinstance(self.pool, GeM) else None


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm layers in eval mode (running statistics fixed), as the reference code trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def to_input(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 normalised with the backbone's mean/std."""
    x = (
        torch.from_numpy(np.require(image, requirements=["C", "W"]))
        .permute(2, 0, 1)
        .unsqueeze(0)
        .float()
        .div_(255.0)
    )
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------- tuples


@dataclass(frozen=True)
class Tuple:
    query: int
    positive: int
    negatives: tuple[int, ...]


def groups_of(keys: list[str], labels: list[str | None]) -> np.ndarray:
    """A group id per image: its label when it has one, else its Holidays group (``NNNNNN // 100``),
    else a group of its own. (n,) int64."""
    names: dict[str, int] = {}
    out = np.empty(len(keys), np.int64)
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        imno = holidays_imno(PurePath(key).name)
        name = f"label:{label}" if label is not None else f"holidays:{imno // 100}" if imno else f"self:{i}"
        out[i] = names.setdefault(name, len(names))
    return out


def anchors_and_positives(groups: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Every image of a group of two or more, paired with another image of its group drawn by ``rng``.
    groups: (n,) -> [(anchor, positive)] in image order."""
    pairs = []
    for i, g in enumerate(groups):
        members = np.flatnonzero(groups == g)
        others = members[members != i]
        if others.size:
            pairs.append((i, int(others[rng.integers(others.size)])))
    return pairs


def hard_negatives(vectors: np.ndarray, groups: np.ndarray, anchor: int, n_neg: int) -> tuple[int, ...]:
    """The ``n_neg`` images most similar to ``anchor`` outside its group, at most one per group (the
    reference code's rule), ties broken by index. vectors: (n, D) unit rows."""
    sims = vectors @ vectors[anchor]  # (n,)
    order = np.lexsort((np.arange(len(sims)), -sims))
    picked: list[int] = []
    seen = {int(groups[anchor])}
    for j in order:
        g = int(groups[j])
        if g in seen:
            continue
        seen.add(g)
        picked.append(int(j))
        if len(picked) == n_neg:
            break
    return tuple(picked)


def mine_tuples(vectors: np.ndarray, groups: np.ndarray, n_neg: int, seed: int, epoch: int) -> list[Tuple]:
    """One epoch's tuples: anchors/positives from the groups (seeded by ``seed`` and ``epoch``), hard
    negatives from ``vectors``, the current embedding (n, D)."""
    rng = np.random.default_rng([seed, epoch])
    pairs = anchors_and_positives(groups, rng)
    return [Tuple(a, p, hard_negatives(vectors, groups, a, n_neg)) for a, p in pairs]


def tuples_table(tuples: list[Tuple], keys: list[str], source: str, epoch: int) -> dict[str, list]:
    """Columns of a tuples Parquet file: query/positive index and path, negatives, source, epoch."""
    return {
        "epoch": [epoch] * len(tuples),
        "query": [t.query for t in tuples],
        "query_path": [keys[t.query] for t in tuples],
        "positive": [t.positive for t in tuples],
        "positive_path": [keys[t.positive] for t in tuples],
        "negatives": [list(t.negatives) for t in tuples],
        "negative_paths": [[keys[n] for n in t.negatives] for t in tuples],
        "source": [source] * len(tuples),
    }


# -------------------------------------------------------------------------- mining without labels


def descriptor_matches(
    desc_a: np.ndarray, desc_b: np.ndarray, ratio: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Tentative correspondences between two sets of local descriptors (float rows, e.g. RootSIFT):
    each descriptor of a with its nearest neighbour in b when the nearest is closer than ``ratio`` times
    the second nearest (Lowe's test) and a is also b's nearest (mutual). (n_a, D), (n_b, D) -> (ia, ib)."""
    if len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d2 = (desc_a**2).sum(1)[:, None] + (desc_b**2).sum(1)[None, :] - 2.0 * desc_a @ desc_b.T  # (n_a, n_b)
    d2 = np.maximum(d2, 0.0)
    order = np.argsort(d2, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(desc_a))
    best, second = d2[rows, order[:, 0]], d2[rows, order[:, 1]]
    ok = best < (ratio**2) * second
    mutual = np.argmin(d2, axis=0)[order[:, 0]] == rows
    ia = np.flatnonzero(ok & mutual)
    return ia, order[ia, 0]


def knn_pairs(vectors: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Candidate pairs (i, j), i < j: j among i's ``k`` nearest neighbours or i among j's, sorted.
    vectors: (n, D) unit rows."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    pairs = set()
    for i in range(len(vectors)):
        order = np.lexsort((np.arange(len(vectors)), -sims[i]))[:k]
        pairs.update((min(i, int(j)), max(i, int(j))) for j in order)
    return sorted(pairs)


def components(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Connected components of the graph on n nodes with edges ``pairs``: (n,) ids numbered by first node."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(root(i), len(ids)) for i in range(n)], np.int64)


# ----------------------------------------------------------------- keeping what the base model knew


def l2sp_penalty(params: dict[str, Tensor], start: dict[str, Tensor], alpha: float) -> Tensor:
    """L2-SP (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with
    convolutional networks", ICML 2018): α/2 · Σ ||w − w0||² over ``params`` (name -> trainable weight),
    w0 = ``start[name]``, the base model's weights. -> scalar (0 when ``alpha`` is 0)."""
    total = torch.zeros((), dtype=torch.float32)
    if alpha == 0 or not params:
        return total
    for name, w in params.items():
        total = total.to(w.device) + (w - start[name].to(w.device)).pow(2).sum()
    return 0.5 * alpha * total


def trunk_stages(trunk: nn.Module) -> list[tuple[str, list[str]]]:
    """The trunk's stages in forward order, each (name, its parameter names): parameters are grouped by
    their name up to the first numeric part (``model.blocks.3`` of timm EfficientNets, ``4`` of a
    torchvision ResNet's layer1 in its trunk, ``features.2``); the named modules before the first numbered
    one form a single stem stage, those after the last one a head stage."""
    units: list[tuple[str, list[str]]] = []
    for name, _ in trunk.named_parameters():
        parts = name.split(".")
        numbered = next((k for k, part in enumerate(parts[:-1]) if part.isdigit()), None)
        key = ".".join(parts[: numbered + 1]) if numbered is not None else None
        if key is None:
            key = "head" if any(u[0] not in ("stem", "head") for u in units) else "stem"
        if units and units[-1][0] == key:
            units[-1][1].append(name)
        else:
            units.append((key, [name]))
    return units


def freeze_stages(trunk: nn.Module, n: int) -> list[str]:
    """Keep the first ``n`` stages of ``trunk_stages`` fixed (``requires_grad`` off); returns their names.
    Their BatchNorm statistics stay fixed with every other's (``freeze_batchnorm``)."""
    stages = trunk_stages(trunk)[:n]
    frozen = {p for _, names in stages for p in names}
    for name, param in trunk.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return [s for s, _ in stages]


def lr_factor(step: int, epoch: int, epochs: int, warmup_steps: int, schedule: str, decay: float) -> float:
    """Learning rate multiplier of optimiser step ``step`` (0-based, counted over the whole training) in
    ``epoch`` (0-based): linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps,
    times the epoch's decay: 1 (constant), exp(−decay·epoch) (exp, as cnnimageretrieval-pytorch's
    ExponentialLR), or (1 + cos(π·epoch/epochs))/2 (cosine)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "exp":
        return warm * float(np.exp(-decay * epoch))
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + float(np.cos(np.pi * epoch / epochs)))
    raise ValueError(f"unknown schedule '{schedule}'")


# --------------------------------------------------------------------------- near-copies among pairs

NEAR_COPY_SHARE = 0.75  # of the verification model's inliers that a tight similarity must also explain
NEAR_COPY_PX = 2.0  # reprojection threshold of that similarity, in pixels at local.max_side


def is_near_copy(inliers: int, similarity_inliers: int) -> bool:
    """A verified pair is a near-copy (a crop, rotation, rescaling, recolouring or recompression of one
    photo) when a similarity transform (rotation, uniform scale, translation) fitted with a tight
    ``NEAR_COPY_PX`` threshold explains at least ``NEAR_COPY_SHARE`` of the inliers the verification model
    (affine or homography, ``verify.threshold``) finds: the points of one picture moved rigidly. Otherwise
    it is a verified view: the scene from another viewpoint, where perspective and parallax move points
    apart by more than a similarity allows."""
    return inliers > 0 and similarity_inliers >= NEAR_COPY_SHARE * inliers
