"""Zero-copy reading and streaming writing of safetensors checkpoints (single file or sharded with an index).

Reading maps each file copy-on-write and hands out tensor views of the mapped bytes, so inputs live in the
page cache (RssFile), never in anonymous memory; a merge that reads its inputs once reads those not already in
the page cache around it instead (`read_around_cache`, direct_read.py), into a few blocks of read-ahead.

Writing lays out every shard's header up front (names, dtypes and shapes are known before any arithmetic), then
appends tensor bytes as they are produced, around the page cache by a writer thread (direct_write.py).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelmerge_engine.direct_read import DirectReader, DirectReadRefused, resident_fraction
from modelmerge_engine.direct_write import DirectFile
from modelmerge_engine.dtype_codes import BF16, F16, F32
from modelmerge_engine.early_reads import ask
from modelmerge_engine.errors import MergeError
from modelmerge_engine.output import write_synced


@dataclass(frozen=True)
class DType:
    """A safetensors dtype and how its bytes are held in numpy (16-bit floats as their uint16 bits)."""

    name: str
    storage: np.dtype
    floating: bool = False
    code: int | None = None  # dtype_codes: the kernels' code of the float formats the engine computes in

    @property
    def size(self) -> int:
        return self.storage.itemsize


DTYPES: dict[str, DType] = {
    dtype.name: dtype
    for dtype in (
        DType("BF16", np.dtype(np.uint16), True, BF16),
        DType("F16", np.dtype(np.uint16), True, F16),
        DType("F32", np.dtype(np.float32), True, F32),
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
READ_AHEAD = 64 << 20  # bytes of each input file asked for ahead of the reads (a cold page cache)
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


def _read_header(path: Path, label: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; errors name the model and file."""
    where = f"{label}: {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise MergeError(f"{where}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER:
                raise MergeError(f"{where}: not a safetensors file (header length {length})")
            if 8 + length > size:
                raise MergeError(f"{where}: cannot read safetensors header: it claims {length} bytes but the file "
                                 f"has {size} (truncated?)")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{where}: cannot read safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise MergeError(f"{where}: cannot read safetensors header: a JSON {type(header).__name__}, not an object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise MergeError(f"{where}: safetensors header: __metadata__ is not an object")
    return header, 8 + length


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(where: str, name: str, meta: object, data_start: int, file_size: int
                  ) -> tuple[DType, tuple[int, ...], int, int]:
    """One header entry checked against the safetensors format: dtype, shape, data offsets of exactly
    shape x dtype size bytes inside the file. Returns (dtype, shape, begin, end) relative to the data."""
    if not isinstance(meta, dict):
        raise MergeError(f"{where}: tensor {name}: header entry is not an object")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise MergeError(f"{where}: tensor {name} has unsupported dtype {meta.get('dtype')}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise MergeError(f"{where}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise MergeError(f"{where}: tensor {name}: data_offsets {offsets!r} is not [begin, end] with "
                         "0 <= begin <= end")
    begin, end = offsets
    needed = numel(tuple(shape)) * dtype.size
    if end - begin != needed:
        raise MergeError(f"{where}: tensor {name}: data_offsets {offsets} hold {end - begin} bytes but shape "
                         f"{shape} of {dtype.name} needs {needed}")
    if data_start + end > file_size:
        raise MergeError(f"{where}: tensor {name}: its data ends at byte {data_start + end} but the file has "
                         f"{file_size} bytes (truncated?)")
    return dtype, tuple(shape), begin, end


def _check_no_overlap(where: str, extents: list[tuple[int, int, str]]) -> None:
    """No two tensors may share bytes (empty tensors share none)."""
    previous = None
    for begin, end, name in sorted(e for e in extents if e[1] > e[0]):
        if previous is not None and begin < previous[1]:
            raise MergeError(f"{where}: tensors {previous[2]} (bytes {previous[0]}-{previous[1]}) and {name} "
                             f"(bytes {begin}-{end}) overlap")
        previous = (begin, end, name)


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
        self._prefetched: dict[Path, int] = {}  # per file: bytes [.., value) were asked for ahead of the reads
        self._early: dict[Path, int] = {}  # per file: bytes [.., value) were asked for before the merge (ask_early)
        self._asking: list = []  # the threads of ask_early
        self.early_bytes = 0  # how many bytes ask_early has asked for
        self._early_fds: dict[Path, int] = {}  # files read around the page cache whose early bytes are read
        self._direct: dict[Path, DirectReader] = {}  # files read around the page cache (read_around_cache)

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise MergeError(f"{self.label}: unreadable {INDEX_NAME}: {exc}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MergeError(f"{self.label}: {INDEX_NAME}: weight_map is not an object of tensor name to "
                                 "shard file name")
            files = sorted(set(weight_map.values()))
            for name in files:  # lexically: a Hub snapshot's files are symlinks into the cache's blobs
                if Path(name).is_absolute() or ".." in Path(name).parts or not name:
                    raise MergeError(f"{self.label}: {INDEX_NAME}: shard {name!r} is outside the model directory")
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
        header, data_start = _read_header(file, self.label)
        where = f"{self.label}: {file}"
        size = file.stat().st_size
        extents = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, begin, end = _tensor_entry(where, name, meta, data_start, size)
            if name in self.tensors:
                raise MergeError(f"{self.label}: tensor {name} appears in two shards")
            self.tensors[name] = TensorInfo(name, dtype, shape, file, data_start + begin)
            extents.append((begin, end, name))
        _check_no_overlap(where, extents)

    def ask_early(self, nbytes: int) -> int:
        """Asks the disk for the first `nbytes` of this model's tensor data, in the order its tensors are read
        (file by file, by offset), before the merge starts (early_reads.py); reads of a range that begins in
        those bytes come from the page cache, even from a file read around it. Bytes asked for by an earlier call
        are not asked again: a larger `nbytes` extends the region. Returns the bytes asked for in all."""
        asked = 0
        for file in self.files:
            extents = [(t.offset, t.offset + t.numel * t.dtype.size) for t in self.tensors.values() if t.file == file]
            if not extents or asked >= nbytes:
                continue
            start, end = min(begin for begin, _ in extents), max(stop for _, stop in extents)
            stop = min(end, start + nbytes - asked)
            asked += stop - start
            before = self._early.get(file, start)
            if stop <= before:
                continue
            self._early[file] = stop
            thread = ask(file, before, stop)
            if thread is not None:
                self._asking.append(thread)
        self.early_bytes = max(self.early_bytes, asked)
        return self.early_bytes

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the tensor, flattened: a view of the mapped file (never write into it),
        or where the tensor's data is not aligned to its dtype (an odd-sized tensor before it) a copy of that
        range alone, so every byte is copied once however the tensor is split into ranges; from a file read
        around the page cache, a copy of the range from its read-ahead, unless the range begins in the bytes
        asked for early (`ask_early`): a copy from the page cache then."""
        info = self.tensors[name]
        reader = self._direct.get(info.file)
        if reader is not None:
            stop = min(stop, info.numel)
            start = min(start, stop)
            offset, nbytes = info.offset + start * info.dtype.size, (stop - start) * info.dtype.size
            try:
                if offset < self._early.get(info.file, 0):
                    raw = self._read_early(info.file, offset, nbytes)
                else:
                    raw = reader.read(offset, nbytes)
            except DirectReadRefused:  # accepted at open, refused at the first read: map it after all
                self._direct.pop(info.file, None)
                reader.close()
            else:
                return raw.view(info.dtype.storage)
        mapped = self._maps.get(info.file)
        if mapped is None:
            with open(info.file, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mapped
        stop = min(stop, info.numel)
        start = min(start, stop)
        offset = info.offset + start * info.dtype.size
        self._read_ahead(info.file, mapped, offset)
        if info.offset % info.dtype.size:
            raw = np.frombuffer(mapped, dtype=np.uint8, count=(stop - start) * info.dtype.size, offset=offset)
            return raw.copy().view(info.dtype.storage)
        return np.frombuffer(mapped, dtype=info.dtype.storage, count=stop - start, offset=offset)

    def _read_early(self, file: Path, offset: int, nbytes: int) -> np.ndarray:
        """A copy of bytes of a file read around the page cache that were asked for early (so the page cache
        holds them), dropped from the page cache once copied: nothing reads them again, and the pod's memory
        cgroup is not left charged for them."""
        fd = self._early_fds[file]
        out = np.empty(nbytes, dtype=np.uint8)
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [out[done:]], offset + done)
            if not got:
                raise OSError(errno.EIO, f"{file}: ended {nbytes - done} bytes early (truncated while merging?)")
            done += got
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def read_around_cache(self, *, ahead: int, only_uncached: bool = True, keep_mapped: Collection[Path] = ()) -> int:
        """From now on, read this model's files that the page cache holds less than half of (every file with
        `only_uncached` False) with O_DIRECT, `ahead` blocks ahead of the reads (direct_read.py): for a merge that
        reads its inputs once, front to back. Files in `keep_mapped` and files whose filesystem refuses O_DIRECT
        stay mapped. Returns how many files are read around the page cache."""
        for file in self.files:
            if file in self._direct or file in keep_mapped or (only_uncached and resident_fraction(file) >= 0.5):
                continue
            try:
                self._direct[file] = DirectReader(file, ahead=ahead, start=self._early.get(file, 0))
                if self._early.get(file):  # opened here, not at the first read: reads come from several threads
                    fd = self._early_fds[file] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                    # no read-ahead of its own past the early bytes: the direct reader reads those, and pages the
                    # kernel read ahead would stay cached (and charged) after the early bytes are dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except DirectReadRefused:
                continue
        return len(self._direct)

    def _read_ahead(self, file: Path, mapped: mmap.mmap, offset: int) -> None:
        """Asks the kernel to read the READ_AHEAD bytes after those being read (madvise WILLNEED), once per byte
        as the reads move on through the file (a pass that starts over, e.g. a second statistics pass, starts
        over here too), so a cold page cache is filled while the kernels compute instead of a page fault at a
        time. Advisory: nothing changes where the pages are already cached, or where madvise is refused. Linux
        reads at most max(read_ahead_kb, max_sectors_kb) per advice (8 MiB of the 64 here); advising in
        early_reads.ADVICE_BYTES steps measured no faster for cold TIES (5 runs each, a noisy day)."""
        ahead = self._prefetched.get(file, 0)
        if offset < ahead - 2 * READ_AHEAD:
            ahead = offset  # a new pass from an earlier point
        if offset + READ_AHEAD // 2 < ahead or ahead >= len(mapped):
            return
        start = max(ahead, offset) & ~(mmap.PAGESIZE - 1)
        length = min(READ_AHEAD, len(mapped) - start)
        if length > 0:
            try:
                mapped.madvise(mmap.MADV_WILLNEED, start, length)
            except (OSError, ValueError, AttributeError):
                pass
        self._prefetched[file] = start + max(length, 0)

    def close(self) -> None:
        for thread in self._asking:
            thread.join()
        self._asking.clear()
        for fd in self._early_fds.values():
            os.close(fd)
        self._early_fds.clear()
        for reader in self._direct.values():
            reader.close()
        self._direct.clear()
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
        self._file: DirectFile | None = None
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
        self._file.write(data)
        self._remaining -= data.nbytes

    def _open_shard(self, shard: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[shard]:
            header[tensor.name] = {"dtype": tensor.dtype.name, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = DirectFile(self.directory / self.file_names[shard])
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._shard = shard

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def finish(self) -> list[str]:
        if self._remaining or self._position != len(self._order) - 1:
            raise RuntimeError("not every planned tensor was written")
        self._close_file()
        if len(self.file_names) > 1:
            weight_map = {tensor.name: self.file_names[shard] for shard, tensor in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_synced(self.directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.abort()
