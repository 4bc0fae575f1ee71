"""Reading and writing safetensors files piece by piece, with memory bounded by the caller's buffers.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a ``get_tensor``
touches stays in the process's resident set until the file is closed. Merging N checkpoints
with the files open would then hold N models' worth of pages (measured: reading a 400 MB file
tensor by tensor grows RSS by 400 MB). Here the format (an 8-byte little-endian header length,
a JSON header of ``name -> {dtype, shape, data_offsets}``, then the raw bytes) is read with
``os.preadv`` straight into buffers the caller owns, any element range of a tensor at a time.

The writer knows every tensor's name, dtype and shape before it starts (a merge's output has
the inputs' layout), so it writes the header first and then streams each tensor's bytes in
order, piece by piece: no tensor is ever whole in memory. It lays tensors out as
``safetensors.torch.save_file`` does (larger element sizes first, header padded to 8 bytes),
so every tensor is aligned for a zero-copy view, and ``safe_open`` / ``from_pretrained`` read the
files like any others.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "FLOAT_DTYPES",
    "SafetensorsFormatError",
    "TensorInfo",
    "read_header",
    "PieceReader",
    "TensorSpec",
    "ShardWriter",
    "plan_shards",
    "parse_size",
]

# The safetensors dtype codes that can be averaged, and their torch dtypes.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {dtype: code for code, dtype in FLOAT_DTYPES.items()}
# Element sizes of every code the format defines (for checking headers; merging refuses non-floats).
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


class SafetensorsFormatError(ValueError):
    """A file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte offset, dtype code, shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of a safetensors file (in the header's order) and its `__metadata__`."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{path}: {size} bytes, too short for a safetensors file.")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise SafetensorsFormatError(f"{path}: header length {length} does not fit the file ({size} bytes).")
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise SafetensorsFormatError(f"{path}: the header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the header is not a JSON object.")
    data_start, data_size = 8 + length, size - 8 - length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: malformed header entry for {name!r}: {entry!r}.") from None
        if dtype not in _ITEMSIZE:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if not (0 <= begin <= end <= data_size and end - begin == nbytes):
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) claims bytes [{begin}, {end}) of a "
                f"{data_size}-byte data section."
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    return tensors, metadata


class PieceReader:
    """Reads element ranges of tensors into caller-owned byte buffers (``os.preadv``, no mmap)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, info: TensorInfo, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, read into the uint8 tensor
        `buffer`; returns them as a 1-D tensor of the stored dtype that views `buffer`."""
        if not (0 <= start and count >= 0 and start + count <= info.numel):
            raise IndexError(f"{info.name}: elements [{start}, {start + count}) out of {info.numel}.")
        nbytes = count * info.itemsize
        target = buffer[:nbytes]
        view = memoryview(target.numpy())
        fd, offset, done = self._fd(info.path), info.offset + start * info.itemsize, 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise SafetensorsFormatError(f"{info.path}: unexpected end of file while reading {info.name!r}.")
            done += got
        self.bytes_read += nbytes
        return target.view(FLOAT_DTYPES[info.dtype]) if info.is_float else target

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> PieceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own, as in transformers). Within a shard, tensors are laid out by decreasing
    element size (stable), so each starts aligned to its element size."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return [sorted(shard, key=lambda s: -_ITEMSIZE[s.dtype]) for shard in shards]


class ShardWriter:
    """Writes one safetensors file: the header up front, then each tensor's bytes in the planned
    order, in as many pieces as the caller likes. `close()` checks that every byte was written."""

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        self.data_bytes = offset
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._handle = self.path.open("wb")
        self._handle.write(struct.pack("<Q", len(text)) + text)
        self._index = 0  # the tensor being written
        self._written = 0  # its bytes written so far
        self.bytes_written = 0
        self._skip_empty()

    def _skip_empty(self) -> None:  # tensors with no elements have no bytes to wait for
        while self.current is not None and self.current.nbytes == 0:
            self._index += 1

    @property
    def current(self) -> TensorSpec | None:
        return self.specs[self._index] if self._index < len(self.specs) else None

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece (a contiguous CPU tensor of the planned dtype) of tensor `name`."""
        spec = self.current
        if spec is None or spec.name != name:
            expected = spec.name if spec else "nothing"
            raise RuntimeError(f"{self.path.name}: expected bytes of {expected!r}, got {name!r}.")
        if DTYPE_CODES.get(piece.dtype) != spec.dtype or not piece.is_contiguous():
            raise RuntimeError(f"{self.path.name}: {name}: a piece of dtype {piece.dtype}, planned {spec.dtype}.")
        data = piece.reshape(-1).view(torch.uint8)
        if self._written + data.numel() > spec.nbytes:
            raise RuntimeError(f"{self.path.name}: {name}: more bytes than its shape holds.")
        self._handle.write(memoryview(data.numpy()))
        self._written += data.numel()
        self.bytes_written += data.numel()
        if self._written == spec.nbytes:
            self._index, self._written = self._index + 1, 0
            self._skip_empty()

    def close(self) -> None:
        self._handle.close()
        if self._index < len(self.specs):
            raise RuntimeError(f"{self.path.name}: closed before {self.specs[self._index].name!r} was written.")

    def abort(self) -> None:
        self._handle.close()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (decimal units, as transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        if unit not in _UNITS or not number:
            raise ValueError(f"cannot read a size from {size!r}; write e.g. 5GB, 500MB or 2GiB.")
        try:
            value = int(float(number) * _UNITS[unit])
        except (ValueError, OverflowError):  # not a number, NaN, or infinite ("infGB", "1e400GB")
            raise ValueError(f"cannot read a size from {size!r}; write e.g. 5GB, 500MB or 2GiB.") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {size!r}.")
    return value
