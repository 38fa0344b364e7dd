"""Benchmark ground-truth files, read safely.

revisitop's ``gnd_<dataset>.pkl`` files are Python pickles; they are read with a restricted unpickler that
only rebuilds builtin containers and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from embedpipe.storage.contracts.errors import InputError

_NUMPY_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
_BUILTIN_GLOBALS = {"set", "frozenset", "slice", "complex"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in _NUMPY_GLOBALS:
            import numpy

            if name in ("ndarray", "dtype"):
                return getattr(numpy, name)
            return getattr(numpy._core.multiarray, name)
        if module == "builtins" and name in _BUILTIN_GLOBALS:
            import builtins

            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a ground-truth file")


def load_pickle_safely(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground-truth file not found: {path}")
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not a readable ground-truth pickle ({err})") from None


def load_revisitop_gnd(path: Path) -> dict[str, Any]:
    """A revisitop ``gnd_*.pkl``: ``{"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"} or
    {"bbx", "ok", "junk"}, ...]}``. Checks the shape and raises ``InputError`` with one line if it is off."""
    data = load_pickle_safely(path)
    if not isinstance(data, dict) or not isinstance(data.get("gnd"), list):
        raise InputError(f"{path}: expected a dict with a 'gnd' list (revisitop format)")
    for i, entry in enumerate(data["gnd"]):
        keys = entry.keys() if isinstance(entry, dict) else set()
        if not ({"easy", "hard", "junk"} <= keys or {"ok", "junk"} <= keys):
            raise InputError(f"{path}: gnd[{i}] has neither easy/hard/junk nor ok/junk lists")
    return data


def load_oxford_gt(folder: Path) -> list[dict[str, Any]]:
    """The original Oxford5k / Paris6k ground truth: for each ``<query>_query.txt`` (sorted by name), the
    query's image name (Oxford's ``oxc1_`` prefix dropped), its box (x1, y1, x2, y2) and the image names of
    its ``_good``, ``_ok`` and ``_junk`` lists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"ground-truth folder not found: {folder}")
    queries = sorted(folder.glob("*_query.txt"))
    if not queries:
        raise InputError(f"{folder}: no *_query.txt files (Oxford/Paris ground truth)")
    out = []
    for qfile in queries:
        name = qfile.name.removesuffix("_query.txt")
        fields = qfile.read_text().split()
        if len(fields) != 5:
            raise InputError(f"{qfile}: expected 'image x1 y1 x2 y2'")
        try:
            bbox = tuple(float(v) for v in fields[1:])
        except ValueError:
            raise InputError(f"{qfile}: the box is not four numbers") from None
        entry = {"name": name, "image": fields[0].removeprefix("oxc1_"), "bbox": bbox}
        for kind in ("good", "ok", "junk"):
            listed = folder / f"{name}_{kind}.txt"
            if not listed.is_file():
                raise InputError(f"{listed}: missing (each query needs _good, _ok and _junk lists)")
            entry[kind] = listed.read_text().split()
        out.append(entry)
    return out
