"""Lazy, tensor-by-tensor safetensors reading and streaming writing with NumPy.

Reading takes a file's header once and then each tensor when asked for; writing
emits the header first (all shapes and dtypes are known up front) and then one tensor at a
time, so converting a 7B checkpoint never holds two copies of the model. bfloat16 is
supported through ml_dtypes. The format: 8-byte little-endian header length, a JSON header
mapping names to dtype, shape and byte offsets, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file; ``get(name)`` reads one tensor into a new NumPy array."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise ValueError(f"{path}: implausible safetensors header size {n}")
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: unsupported dtype {e['dtype']} for {name}")
        lo, hi = e["data_offsets"]
        # Read into a new array rather than viewing a memory map: mapped pages, once read,
        # stay in the process's resident set, so loading would hold the file and the copy.
        out = np.empty(hi - lo, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._base + lo)
            if f.readinto(out) != hi - lo:
                raise ValueError(f"{self.path}: truncated data for {name}")
        return out.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(
    path: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors named in ``specs`` (name, shape, dtype), fetching each with ``produce``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    order = []
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"cannot write dtype {dtype} ({name})")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        order.append((name, tuple(shape), dtype))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in order:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != shape:
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(arr.reshape(-1).view(np.uint8))  # the array's own bytes, no copy
            del arr  # may view a whole parameter: let it go before the next is read
    os.replace(tmp, path)


class CheckpointReader:
    """All tensors of a Hugging Face model directory: single file, sharded with an index,
    or PyTorch ``.bin`` files (read with torch ``weights_only=True``, only if installed)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, SafetensorsFile] = {}
        self._bin: dict[str, np.ndarray] = {}
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(directory, fn))
                     for fn in sorted(set(weight_map.values()))}
            self._where = {k: files[fn] for k, fn in weight_map.items()}
        elif os.path.exists(single):
            st = SafetensorsFile(single)
            self._where = dict.fromkeys(st.keys(), st)
        else:
            bins = sorted(fn for fn in os.listdir(directory)
                          if fn.startswith("pytorch_model") and fn.endswith(".bin"))
            if not bins:
                raise FileNotFoundError(
                    f"{directory}: no model.safetensors, model.safetensors.index.json or "
                    "pytorch_model*.bin"
                )
            self._bin = _read_torch_bins([os.path.join(directory, b) for b in bins])

    def keys(self) -> list[str]:
        return list(self._where) or list(self._bin)

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._bin

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._where:
            return self._where[name].shape(name)
        return tuple(self._bin[name].shape)

    def get(self, name: str) -> np.ndarray:
        if name in self._where:
            return self._where[name].get(name)
        if name in self._bin:
            return self._bin[name]
        raise KeyError(f"{self.directory}: tensor {name!r} not found")

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)


def _read_torch_bins(paths: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415  (optional, only for legacy .bin checkpoints)
    except ImportError as e:
        raise ImportError(
            f"{paths[0]} is a PyTorch .bin checkpoint; reading it needs torch installed "
            "(pip install torch). Convert it to safetensors to avoid the dependency."
        ) from e
    out = {}
    for p in paths:
        # weights_only=True: tensors and plain containers only, never arbitrary pickles.
        state = torch.load(p, map_location="cpu", weights_only=True)
        for k, v in state.items():
            if v.dtype == torch.bfloat16:
                out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = v.numpy()
    return out
