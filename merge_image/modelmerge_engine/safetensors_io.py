"""Zero-copy reading and streaming writing of safetensors checkpoints (single file or sharded with an index).

Reading maps each file copy-on-write and hands out tensor views of the mapped bytes, so inputs live in the
page cache (RssFile), never in anonymous memory. Writing lays out every shard's header up front (names,
dtypes and shapes are known before any arithmetic), then appends tensor bytes as they are produced.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelmerge_engine.errors import MergeError
from modelmerge_engine.output import write_synced


@dataclass(frozen=True)
class DType:
    """A safetensors dtype and how its bytes are held in numpy (16-bit floats as their uint16 bits)."""

    name: str
    storage: np.dtype
    floating: bool = False
    code: int | None = None  # the cpu_kernels code of the float formats the engine computes in

    @property
    def size(self) -> int:
        return self.storage.itemsize


DTYPES: dict[str, DType] = {
    dtype.name: dtype
    for dtype in (
        DType("BF16", np.dtype(np.uint16), True, 0),
        DType("F16", np.dtype(np.uint16), True, 1),
        DType("F32", np.dtype(np.float32), True, 2),
        DType("F64", np.dtype(np.float64), True),
        DType("I64", np.dtype(np.int64)),
        DType("I32", np.dtype(np.int32)),
        DType("I16", np.dtype(np.int16)),
        DType("I8", np.dtype(np.int8)),
        DType("U8", np.dtype(np.uint8)),
        DType("BOOL", np.dtype(np.bool_)),
        DType("F8_E4M3", np.dtype(np.uint8), True),
        DType("F8_E5M2", np.dtype(np.uint8), True),
    )
}
COMPUTE_DTYPES = {"bfloat16": DTYPES["BF16"], "float16": DTYPES["F16"], "float32": DTYPES["F32"]}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        return numel(self.shape)


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise MergeError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER:
                raise MergeError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: cannot read safetensors header: {exc}") from None
    return header, 8 + length


class SafetensorsModel:
    """The tensors of one checkpoint directory, by name, as read-only views into mapped files."""

    def __init__(self, directory: Path, label: str):
        self.directory = Path(directory)
        self.label = label
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._index_file(file)
        self._maps: dict[Path, mmap.mmap] = {}

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise MergeError(f"{self.label}: unreadable {INDEX_NAME}: {exc}") from None
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (self.directory / name).is_file()]
            if missing:
                raise MergeError(f"{self.label}: shard listed in {INDEX_NAME} is missing: {missing[0]}")
            return [self.directory / name for name in files]
        if (self.directory / SINGLE_NAME).is_file():
            return [self.directory / SINGLE_NAME]
        others = sorted(self.directory.glob("*.safetensors"))
        if others:
            return others
        hint = " (found PyTorch .bin weights; convert them to safetensors first)" if any(
            self.directory.glob("*.bin")) else ""
        raise MergeError(f"{self.label}: no safetensors weights in {self.directory}{hint}")

    def _index_file(self, file: Path) -> None:
        header, data_start = _read_header(file)
        size = file.stat().st_size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise MergeError(f"{self.label}: tensor {name} has unsupported dtype {meta.get('dtype')}")
            begin, end = meta["data_offsets"]
            if data_start + end > size:
                raise MergeError(f"{self.label}: {file.name} is truncated (tensor {name})")
            if name in self.tensors:
                raise MergeError(f"{self.label}: tensor {name} appears in two shards")
            self.tensors[name] = TensorInfo(name, dtype, tuple(meta["shape"]), file, data_start + begin)

    def flat(self, name: str) -> np.ndarray:
        """A 1-D view of the tensor's data in the mapped file (no copy; never write into it)."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        if mapped is None:
            with open(info.file, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mapped
        if info.offset % info.dtype.size:  # unaligned data (odd-sized tensor before it): copy it once
            raw = np.frombuffer(mapped, dtype=np.uint8, count=info.numel * info.dtype.size, offset=info.offset)
            return raw.copy().view(info.dtype.storage)
        return np.frombuffer(mapped, dtype=info.dtype.storage, count=info.numel, offset=info.offset)

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
        self._maps.clear()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.size


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy in-order packing, like transformers' save_pretrained: a tensor larger than the limit gets a
    shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors in order, chunk by chunk, into shards whose headers are written first."""

    def __init__(self, directory: Path, tensors: list[PlannedTensor], max_shard_bytes: int):
        self.directory = directory
        self.shards = plan_shards(tensors, max_shard_bytes)
        count = len(self.shards)
        self.file_names = [SINGLE_NAME] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [(shard, tensor) for shard, items in enumerate(self.shards) for tensor in items]
        self._position = -1
        self._remaining = 0
        self._handle = None
        self._shard = -1
        self.total_bytes = sum(t.nbytes for t in tensors)

    def begin_tensor(self, name: str) -> None:
        if self._remaining:
            raise RuntimeError(f"tensor {self._order[self._position][1].name} was not completely written")
        self._position += 1
        shard, tensor = self._order[self._position]
        if tensor.name != name:
            raise RuntimeError(f"expected tensor {tensor.name}, got {name}")
        if shard != self._shard:
            self._open_shard(shard)
        self._remaining = tensor.nbytes

    def write(self, chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        if data.nbytes > self._remaining:
            raise RuntimeError("more data than the tensor's planned size")
        self._handle.write(memoryview(data))
        self._remaining -= data.nbytes

    def _open_shard(self, shard: int) -> None:
        self._close_handle()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[shard]:
            header[tensor.name] = {"dtype": tensor.dtype.name, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.directory / self.file_names[shard], "wb", buffering=8 << 20)  # noqa: SIM115
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)
        self._shard = shard

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        if self._remaining or self._position != len(self._order) - 1:
            raise RuntimeError("not every planned tensor was written")
        self._close_handle()
        if len(self.file_names) > 1:
            weight_map = {tensor.name: self.file_names[shard] for shard, tensor in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_synced(self.directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except OSError:  # flushing the buffer fails again when the disk is full
                pass
