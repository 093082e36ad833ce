"""The process runtime: a container as a local process group, for machines with no container runtime.

The image is ignored, and so are the security context and the limits: the process runs as the test's user on
the host's filesystem. ``command`` + ``args`` is the argv (there is no image entrypoint, so a container without
a command cannot start); ``python``/``python3`` as argv[0] mean this interpreter, whose bin folder comes first
on PATH so the test venv's console scripts resolve. The environment is the host's plus the container's.

Paths. The process sees the host's filesystem, not the container's, so every mount's container path (the
termination-message path is one) that appears as a whole path in the argv, in env values or in ``workingDir``
is rewritten to its host folder: with ``/data`` mounted from claim ``out``, ``/data/x`` and ``--output=/data``
become ``<claim folder>/x`` and ``--output=<claim folder>``, while ``/database`` is left alone. Paths the
program builds from pieces are not rewritten. Without a ``workingDir`` (or one that does not exist on this
machine) the process runs in ``<pod folder>/work``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.kube.kubelet.runtime import ContainerSpec, ContainerStartError, Mount

TERMINATION_MESSAGE_LIMIT = 4096
INTERPRETERS = ("python", "python3")
KILL_WAIT_SECONDS = 5.0


class ProcessContainer:
    def __init__(self, process: subprocess.Popen, termination_message_file: Path) -> None:
        self.process = process
        self.id = str(process.pid)
        self.termination_message_file = termination_message_file

    def wait(self, timeout: float) -> int | None:
        try:
            return _exit_code(self.process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float) -> int:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_SECONDS)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                return _exit_code(self.process.wait(timeout=wait))
            except subprocess.TimeoutExpired:
                continue
        return _exit_code(self.process.wait())

    def termination_message(self) -> str:
        with open(self.termination_message_file, "rb") as f:
            return f.read(TERMINATION_MESSAGE_LIMIT).decode(errors="replace")


class ProcessRuntime:
    name = "process"
    version = "1"

    def start(self, spec: ContainerSpec) -> ProcessContainer:
        if not spec.command:
            raise ContainerStartError(
                f"container {spec.name!r} has no command: the process runtime cannot run an image's entrypoint"
            )
        rewrite = _mount_rewriter(spec.mounts)
        argv = [rewrite(part) for part in (*spec.command, *spec.args)]
        if argv[0] in INTERPRETERS:
            argv[0] = sys.executable
        work = spec.pod_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        cwd = Path(rewrite(spec.working_dir)) if spec.working_dir else work
        env = {
            **os.environ,
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            "HOSTNAME": spec.pod_name,
            **{key: rewrite(value) for key, value in spec.env.items()},
        }
        try:
            with open(spec.log_file, "ab") as log:
                process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd if cwd.is_dir() else work,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as e:
            raise ContainerStartError(f"exec {argv[0]!r}: {e.strerror}") from e
        return ProcessContainer(process, spec.termination_message_file)


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def _mount_rewriter(mounts: tuple[Mount, ...]) -> Callable[[str], str]:
    """A function replacing each mount's container path (as a whole path prefix) in a string by its host path."""
    table = {m.container_path.rstrip("/"): str(m.host_path) for m in mounts if m.container_path.rstrip("/")}
    if not table:
        return lambda s: s
    keys = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.\-/])(" + "|".join(map(re.escape, keys)) + r")(?![\w.\-])")
    return lambda s: pattern.sub(lambda m: table[m.group(1)], s)
