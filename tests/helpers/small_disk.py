"""A tiny tmpfs mounted for a test, to fill a disk for real (needs root; the test is skipped where mounting is
refused)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(mount: Path, *, size: str) -> Iterator[Path]:
    """`mount` (created) holding a tmpfs of `size` (mount's size= option, e.g. "64k") while the block runs."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
