"""The container runtime interface of the test kubelet.

The harness resolves everything on the Kubernetes side first: the pod's volumes become host folders, its env is
read from values, Secrets, ConfigMaps and the downward API, its security context and limits are made effective.
What is left is a :class:`ContainerSpec`, and a :class:`ContainerRuntime` only turns that into something that
runs. A runtime:

* sends the container's stdout and stderr, interleaved, to ``spec.log_file`` (appending), which the log server
  serves and ``terminationMessagePolicy: FallbackToLogsOnError`` reads;
* makes every :class:`Mount` (the termination-message file is one) visible at its container path;
* raises :class:`ContainerCreateError` when the container cannot be created (yet): the pod stays Pending with
  that reason and the harness tries again (ErrImagePull, CreateContainerConfigError, ... on a real node), or
  :class:`ContainerStartError` when it was created but could not start: the container terminates with exit code
  128 and reason ``StartError``, as on a real node;
* raises :class:`UnsupportedPod` for what it does not do (the pod stays Pending with reason ``UnsupportedByHarness``).

:class:`~tests.kube.kubelet.process.ProcessRuntime` runs containers as local processes; another runtime (podman,
say) is one more module implementing the same two protocols, handed to ``FakeKubelet(runtime=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class ContainerCreateError(Exception):
    """The container cannot be created yet; the pod waits with ``reason`` (e.g. ``CreateContainerConfigError``)
    and the harness retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ContainerStartError(Exception):
    """The container was created but its process could not start (e.g. the executable does not exist)."""


class UnsupportedPod(ValueError):
    """The pod asks for something the harness (or its runtime) does not do; the pod stays Pending with the message."""


@dataclass(frozen=True)
class Mount:
    """A host folder or file seen by the container at ``container_path``."""

    container_path: str
    host_path: Path
    read_only: bool = False
    memory_backed: bool = False  # an emptyDir with medium Memory, e.g. /dev/shm
    size_limit: int | None = None  # bytes: an emptyDir's sizeLimit


@dataclass(frozen=True)
class SecurityContext:
    """The effective security context: the container's fields over the pod's (fsGroup is the pod's own)."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_non_root: bool = False
    fs_group: int | None = None
    read_only_root_filesystem: bool = False
    allow_privilege_escalation: bool | None = None
    capabilities_add: tuple[str, ...] = ()
    capabilities_drop: tuple[str, ...] = ()
    seccomp_profile: str | None = None  # RuntimeDefault, Unconfined or Localhost


@dataclass(frozen=True)
class ResourceLimits:
    cpu: float | None = None  # cores
    memory: int | None = None  # bytes


@dataclass(frozen=True)
class ContainerSpec:
    """A pod's container with every reference resolved: what a runtime needs to run it."""

    namespace: str
    pod_name: str
    pod_uid: str
    name: str
    image: str
    image_pull_policy: str
    command: tuple[str, ...]  # empty: the image's entrypoint
    args: tuple[str, ...]  # empty (with no command): the image's cmd
    working_dir: str | None
    env: dict[str, str]
    mounts: tuple[Mount, ...]
    termination_message_file: Path  # the host file mounted at the container's terminationMessagePath
    log_file: Path
    pod_dir: Path  # a host folder of the pod's own, for the runtime's use
    security: SecurityContext = field(default_factory=SecurityContext)
    limits: ResourceLimits = field(default_factory=ResourceLimits)


class RunningContainer(Protocol):
    id: str  # the pod status shows it as "<runtime name>://<id>"

    def wait(self, timeout: float) -> int | None:
        """The exit code once the container has ended (128 + N when signal N ended it), or None when it still
        runs after ``timeout`` seconds."""

    def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""

    def termination_message(self) -> str:
        """What the container wrote to its termination-message file (at most 4096 bytes, as a kubelet reads)."""


class ContainerRuntime(Protocol):
    name: str  # the scheme of container IDs and of the Node's containerRuntimeVersion
    version: str

    def start(self, spec: ContainerSpec) -> RunningContainer: ...
