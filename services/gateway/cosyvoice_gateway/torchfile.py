"""Read a `torch.save`d file of plain containers and tensors without torch (the gateway image has none).

The zip format torch writes (torch >= 1.6): `<archive>/data.pkl` pickles the object; each tensor storage is a
persistent id `("storage", <dtype class>, key, location, numel)` whose bytes are `<archive>/data/<key>`
(little-endian), rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`. Only those
and builtin containers are allowed: any other global in the pickle is refused, so nothing is executed.
Tensors come back as numpy arrays (bfloat16 as float32).
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_BFLOAT16_SHIFT = 16


class TorchFileError(ValueError):
    """Not a torch zip file, or one holding more than plain containers and tensors."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        raise TorchFileError(f"refusing pickled global {module}.{name}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
        dtype, key = _STORAGE_DTYPES[pid[1].name], pid[2]
        raw = self._archive.read(f"{self._prefix}data/{key}")
        if dtype == "bfloat16":
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << _BFLOAT16_SHIFT).view(np.float32)
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))


def load(path: str | Path) -> Any:
    """The object a `torch.save(obj, path)` wrote, tensors as numpy arrays."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise TorchFileError(f"{path}: not a torch zip file (legacy torch.save format?)") from exc
    with archive:
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise TorchFileError(f"{path}: no data.pkl")
        return _Unpickler(archive.read(pkl), archive, pkl[: -len("data.pkl")]).load()
