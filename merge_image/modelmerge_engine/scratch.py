"""Working arrays of one tensor's statistics that can be larger than a pod's memory limit.

A top-k selection over a whole tensor (mergekit's ties, breadcrumbs and sce pick elements by rank, with torch's
tie order at the boundary) needs every element's key and position at once: 8-9 bytes an element, over 1 GiB for
the embedding of a 0.5B model. Held in anonymous memory that is killed under a 256 MiB limit. Above
`IN_MEMORY_BYTES` the arrays are instead views of a shared mapping of an unlinked file in TMPDIR (the merge pod's
scratch emptyDir): page cache the kernel can write back and drop under a memory limit, and without one as fast
as anonymous memory. Nothing is left behind: the file has no name, and its blocks are freed when the last view
of the mapping is gone (the mapping holds its own descriptor), even when the process is killed.

The file's blocks are reserved before it is mapped, so a full TMPDIR is a clear error here, not a SIGBUS on
some later write into a hole.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading

import numpy as np

from modelmerge_engine.errors import MergeError

IN_MEMORY_BYTES = 48 << 20  # arrays of one call up to this size stay in anonymous memory
ALIGNMENT = 64


_thread = threading.local()


def scratch_arrays(specs: list[tuple[np.dtype | type, int]], *, purpose: str, per_thread: bool = False
                   ) -> list[np.ndarray]:
    """Uninitialised 1-D arrays of these (dtype, length); in anonymous memory when they are small together, else
    in one file-backed mapping (see the module docstring). `purpose` names them in an error. `per_thread`: small
    arrays are views of a buffer the calling thread reuses (valid until its next such call), so a loop over many
    tensors does not fault in fresh pages for each."""
    dtypes = [np.dtype(dtype) for dtype, _ in specs]
    offsets, total = [], 0
    for dtype, (_, length) in zip(dtypes, specs, strict=True):
        total = -(-total // ALIGNMENT) * ALIGNMENT
        offsets.append(total)
        total += dtype.itemsize * int(length)
    if total <= IN_MEMORY_BYTES:
        if not per_thread:
            return [np.empty(int(length), dtype) for dtype, (_, length) in zip(dtypes, specs, strict=True)]
        buffer = getattr(_thread, "buffer", None)
        if buffer is None or buffer.shape[0] < total:
            buffer = _thread.buffer = np.empty(max(total, 1 << 20), np.uint8)
        return [buffer[offset:offset + dtype.itemsize * int(length)].view(dtype)
                for dtype, (_, length), offset in zip(dtypes, specs, offsets, strict=True)]
    directory = tempfile.gettempdir()
    try:
        with tempfile.TemporaryFile(prefix="modelmerge-scratch-", dir=directory) as file:
            os.posix_fallocate(file.fileno(), 0, total)
            mapping = mmap.mmap(file.fileno(), total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as error:
        raise MergeError(f"{purpose}: cannot reserve {total} bytes of scratch space in TMPDIR ({directory}): "
                         f"{error.strerror or error}") from error
    return [np.frombuffer(mapping, dtype=dtype, count=int(length), offset=offset)
            for dtype, (_, length), offset in zip(dtypes, specs, offsets, strict=True)]
