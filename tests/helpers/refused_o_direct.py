"""A filesystem that refuses O_DIRECT (as tmpfs on older kernels, or some network filesystems do), for the tests of
the engine's direct reads and writes: opening with O_DIRECT fails with EINVAL, any other open works."""

from __future__ import annotations

import errno
import os


def refuse_o_direct_at_open(monkeypatch) -> None:
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
