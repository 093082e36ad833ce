"""The podman runtime: a pod's container as a real container from its image, for machines with podman.

What the harness resolved (:class:`~.runtime.ContainerSpec`) becomes one ``podman create`` + ``podman start
--attach``, as a kubelet's CRI runtime would run it:

* image and ``imagePullPolicy`` against the local image store: ``Never`` needs the image there
  (``ErrImageNeverPull``), ``IfNotPresent`` pulls only when it is missing, ``Always`` pulls; a failed pull is
  ``ErrImagePull`` naming the image. The pod waits (Pending) with that reason, as on a real node.
* ``command`` replaces the image's entrypoint, ``args`` its cmd; ``workingDir``; env values are handed to podman
  in an ``--env-file`` only root can read, so Secret values never appear in a command line.
* security context: ``runAsUser``/``runAsGroup`` (``--user``), ``fsGroup`` (a supplementary group, and the
  writable volumes group-owned by it and setgid, as the kubelet does), ``runAsNonRoot`` (a container that would
  run as root is refused with the kubelet's CreateContainerConfigError message), ``readOnlyRootFilesystem``
  (``--read-only`` with no tmpfs added: / and /tmp are read-only as on a node), ``allowPrivilegeEscalation:
  false`` (no-new-privileges), capabilities added and dropped, seccomp (``RuntimeDefault``: podman's default
  profile; unset or ``Unconfined``: none, the kubelet's default; ``Localhost`` is refused).
* limits: ``--memory`` and ``--cpus``.
* mounts: host folders bind-mounted (read-only where the volume is), an emptyDir with medium Memory as a tmpfs
  (``/dev/shm`` as podman's shm of that size), the termination-message file writable by any user (the kubelet
  creates it 0666).
* host network and the pod's name as hostname; the harness's own rlimits (podman's defaults can exceed the
  hard limits of the machine, and the container would not start).

Each container carries the label ``io.kubernetes.pod.uid`` and the label ``LABEL`` with the runtime's
``instance``, so :meth:`PodmanRuntime.remove_all` removes exactly what this runtime created.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import uuid
from pathlib import Path

from tests.kube.kubelet.runtime import ContainerCreateError, ContainerSpec, ContainerStartError, Mount, UnsupportedPod

TERMINATION_MESSAGE_LIMIT = 4096
LABEL = "io.modelmerge.test-kubelet"
SHM = "/dev/shm"
NPROC_LIMIT = 4096


def podman_available() -> bool:
    """podman is installed and can run a container here (not merely on PATH)."""
    if shutil.which("podman") is None:
        return False
    return subprocess.run(["podman", "info"], capture_output=True).returncode == 0


class PodmanContainer:
    def __init__(self, name: str, container_id: str, follower: subprocess.Popen, termination_file: Path) -> None:
        self.name = name
        self.id = container_id
        self.follower = follower
        self.termination_file = termination_file

    def wait(self, timeout: float) -> int | None:
        try:
            self.follower.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code()

    def exit_code(self) -> int:
        """The container's exit code, once it has exited (`podman wait` returns it)."""
        return int(_podman("wait", self.name).stdout.strip())

    def stop(self, grace: float) -> int:
        _podman("stop", "--time", str(max(int(grace), 0)), self.name, check=False)
        self.follower.wait()
        return self.exit_code()

    def termination_message(self) -> str:
        with open(self.termination_file, "rb") as f:
            return f.read(TERMINATION_MESSAGE_LIMIT).decode(errors="replace")


class PodmanRuntime:
    name = "podman"

    def __init__(self) -> None:
        self.version = _podman("version", "--format", "{{.Client.Version}}").stdout.strip()
        self.instance = uuid.uuid4().hex[:12]

    def start(self, spec: ContainerSpec) -> PodmanContainer:
        self._ensure_image(spec)
        self._check_non_root(spec)
        name = f"k8s_{spec.name}_{spec.pod_name}_{spec.namespace}_{spec.pod_uid[:8]}"
        _podman("rm", "--force", "--ignore", name, check=False)
        created = _podman("create", *self._options(spec, name), spec.image, *spec.args, check=False)
        if created.returncode != 0:
            raise ContainerCreateError("CreateContainerError", created.stderr.strip() or created.stdout.strip())
        container_id = created.stdout.strip().splitlines()[-1]
        started = _podman("start", name, check=False)
        if started.returncode != 0:  # e.g. the executable does not exist: StartError, exit code 128 on a node
            raise ContainerStartError(started.stderr.strip().removeprefix("Error: "))
        # `podman logs --follow` writes everything the container printed from its start and ends when it exits.
        with open(spec.log_file, "ab") as log:
            follower = subprocess.Popen(
                ["podman", "logs", "--follow", name], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        return PodmanContainer(name, container_id, follower, spec.termination_message_file)

    def remove_all(self) -> None:
        """Removes every container this runtime created (running ones are killed)."""
        listed = _podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.instance}", check=False)
        ids = listed.stdout.split()
        if ids:
            _podman("rm", "--force", *ids, check=False)

    # --- the pieces ----------------------------------------------------------------------------------------

    def _ensure_image(self, spec: ContainerSpec) -> None:
        present = _podman("image", "exists", spec.image, check=False).returncode == 0
        policy = spec.image_pull_policy
        if policy == "Never" and not present:
            raise ContainerCreateError(
                "ErrImageNeverPull", f'Container image "{spec.image}" is not present with pull policy of Never'
            )
        if policy == "Always" or not present:
            pulled = _podman("pull", "--quiet", spec.image, check=False)
            if pulled.returncode != 0:
                detail = pulled.stderr.strip().splitlines()[-1] if pulled.stderr.strip() else "pull failed"
                raise ContainerCreateError("ErrImagePull", f'failed to pull image "{spec.image}": {detail}')

    def _check_non_root(self, spec: ContainerSpec) -> None:
        """runAsNonRoot as the kubelet checks it: against runAsUser, else the image's USER (numeric only)."""
        security = spec.security
        if not security.run_as_non_root:
            return
        if security.run_as_user is not None:
            if security.run_as_user == 0:
                raise ContainerCreateError(
                    "CreateContainerConfigError",
                    "container's runAsUser breaks non-root policy "
                    f'(pod: "{spec.pod_name}_{spec.namespace}({spec.pod_uid})", container: {spec.name})',
                )
            return
        user = _podman("image", "inspect", "--format", "{{.Config.User}}", spec.image).stdout.strip()
        uid = user.split(":")[0] or "0"
        if not uid.isdigit():
            raise ContainerCreateError(
                "CreateContainerConfigError",
                f"container has runAsNonRoot and image has non-numeric user ({uid}), "
                f'cannot verify user is non-root (pod: "{spec.pod_name}_{spec.namespace}({spec.pod_uid})", '
                f"container: {spec.name})",
            )
        if int(uid) == 0:
            raise ContainerCreateError(
                "CreateContainerConfigError",
                "container has runAsNonRoot and image will run as root "
                f'(pod: "{spec.pod_name}_{spec.namespace}({spec.pod_uid})", container: {spec.name})',
            )

    def _env_file(self, spec: ContainerSpec) -> Path:
        """The container's env as a file only root can read (Secret values never on a command line)."""
        for key, value in spec.env.items():
            if "\n" in value:
                raise UnsupportedPod(f"env {key!r}: values with newlines are not supported by the podman runtime of "
                                     "the kubelet harness")
        path = spec.pod_dir / "podman.env"
        path.touch(mode=0o600)
        path.write_text("".join(f"{key}={value}\n" for key, value in spec.env.items()))
        return path

    def _options(self, spec: ContainerSpec, name: str) -> list[str]:
        security, limits = spec.security, spec.limits
        options = [
            "--name",
            name,
            "--label",
            f"{LABEL}={self.instance}",
            "--label",
            f"io.kubernetes.pod.uid={spec.pod_uid}",
            "--label",
            f"io.kubernetes.pod.name={spec.pod_name}",
            "--label",
            f"io.kubernetes.pod.namespace={spec.namespace}",
            "--network",
            "host",
            "--hostname",
            spec.pod_name,
            "--pull",
            "never",
        ]
        options += ulimit_options()
        if spec.env:
            options += ["--env-file", str(self._env_file(spec))]
        if spec.command:
            options += ["--entrypoint", _json_list(spec.command)]
        if spec.working_dir:
            options += ["--workdir", spec.working_dir]
        if security.run_as_user is not None:
            user = str(security.run_as_user)
            if security.run_as_group is not None:
                user += f":{security.run_as_group}"
            options += ["--user", user]
        elif security.run_as_group is not None:
            raise UnsupportedPod(
                f"container {spec.name!r}: runAsGroup without runAsUser is not supported by the "
                "podman runtime of the kubelet harness"
            )
        if security.fs_group is not None:
            options += ["--group-add", str(security.fs_group)]
        if security.read_only_root_filesystem:
            options += ["--read-only", "--read-only-tmpfs=false"]
        if security.allow_privilege_escalation is False:
            options += ["--security-opt", "no-new-privileges"]
        for capability in security.capabilities_drop:
            options += ["--cap-drop", capability.lower()]
        for capability in security.capabilities_add:
            options += ["--cap-add", capability.lower()]
        if security.seccomp_profile == "Localhost":
            raise UnsupportedPod(
                f"container {spec.name!r}: seccomp Localhost profiles are not supported by the "
                "podman runtime of the kubelet harness"
            )
        if security.seccomp_profile != "RuntimeDefault":
            options += ["--security-opt", "seccomp=unconfined"]
        if limits.memory is not None:
            options += ["--memory", str(limits.memory), "--memory-swap", str(limits.memory)]
        if limits.cpu is not None:
            options += ["--cpus", f"{limits.cpu:g}"]
        for mount in spec.mounts:
            options += self._mount(spec, mount)
        return options

    def _mount(self, spec: ContainerSpec, mount: Mount) -> list[str]:
        if mount.memory_backed:
            size = mount.size_limit
            if mount.container_path.rstrip("/") == SHM:
                return ["--shm-size", str(size)] if size else []
            return [
                "--mount",
                f"type=tmpfs,destination={mount.container_path}" + (f",tmpfs-size={size}" if size else ""),
            ]
        if mount.host_path == spec.termination_message_file:
            mount.host_path.chmod(0o666)
        elif not mount.read_only and mount.host_path.is_dir():
            _give_to_group(mount.host_path, spec.security.fs_group)
        options = f"type=bind,source={mount.host_path},destination={mount.container_path}"
        return ["--mount", options + (",ro=true" if mount.read_only else "")]


def ulimit_options() -> list[str]:
    """podman's default rlimits can exceed what this machine lets a container set (runc then fails with "error
    setting rlimits"): open files as the harness has them, processes at a fixed NPROC_LIMIT."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={NPROC_LIMIT}:{NPROC_LIMIT}"]


def _give_to_group(folder: Path, fs_group: int | None) -> None:
    """What the kubelet does to a writable volume for fsGroup: group-owned, group-writable, setgid folders.
    Without fsGroup the folder is left as it is (a container user other than its owner cannot write it)."""
    if fs_group is None:
        return
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, -1, fs_group)
        mode = path.stat().st_mode
        path.chmod(mode | 0o060 | (0o2000 if path.is_dir() else 0))


def _json_list(items: tuple[str, ...]) -> str:
    return json.dumps(list(items))


def _podman(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {args[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result
