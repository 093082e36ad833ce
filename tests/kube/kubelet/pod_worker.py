"""Running one pod bound to the harness's Node, from creation to its end, on a container runtime.

Creation is retried every second while something the container needs is missing (the pod is Pending, its
container waiting with the reason). A pod the harness does not run as asked (see
containers.py) stays Pending with reason ``UnsupportedByHarness`` and a message saying why. The pod's
``activeDeadlineSeconds`` is honoured (the pod then fails with
reason DeadlineExceeded). When the pod is deleted its container is stopped (SIGTERM, then SIGKILL after the
grace period, at most ``MAX_GRACE_SECONDS``); the harness then confirms the deletion. The termination message
is the container's termination-message file, or with ``FallbackToLogsOnError`` the tail of its log when it
failed without one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.kube.kubelet.runtime import (
    ContainerCreateError,
    ContainerRuntime,
    ContainerSpec,
    ContainerStartError,
    RunningContainer,
    UnsupportedPod,
)
from tests.kube.kubelet.status import StatusReporter, now, running, terminated, waiting

log = logging.getLogger(__name__)

CREATE_RETRY_SECONDS = 1.0
POLL_SECONDS = 0.1
MAX_GRACE_SECONDS = 5.0
START_ERROR_EXIT_CODE = 128
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048


class PodWorker:
    """A thread running ``pod``; :meth:`kill` stops it (``deleted``: the pod is being deleted, so the final
    status is reported; otherwise the harness is stopping and leaves the pod's status alone). ``on_done`` is
    called when the thread is about to end; the harness marks the worker ``done`` then."""

    def __init__(
        self,
        pod: dict[str, Any],
        *,
        runtime: ContainerRuntime,
        reporter: StatusReporter,
        resolve: Callable[[dict[str, Any]], ContainerSpec],
        on_done: Callable[[PodWorker], None],
    ) -> None:
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.runtime = runtime
        self.reporter = reporter
        self.resolve = resolve
        self.on_done = on_done
        self.log_file: Path | None = None
        self.deleted = False
        self.done = False
        self._kill = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pod-{self.namespace}-{self.name}")

    def start(self) -> None:
        self._thread.start()

    def kill(self, *, deleted: bool) -> None:
        self.deleted = self.deleted or deleted
        self._kill.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._run_pod()
        except UnsupportedPod as e:  # Pending, not Failed: a ReplicaSet would replace a failed pod at once, forever
            self.reporter.pod_phase(
                self.namespace, self.name, phase="Pending", reason="UnsupportedByHarness", message=str(e)
            )
        except Exception as e:  # report instead of leaving the pod Running forever
            log.exception("kubelet harness: pod %s/%s", self.namespace, self.name)
            if not self._kill.is_set():
                message = f"kubelet harness: {e}"
                self.reporter.pod_phase(
                    self.namespace, self.name, phase="Failed", reason="HarnessError", message=message
                )
        finally:
            self.on_done(self)

    def _run_pod(self) -> None:
        started, t0 = now(), time.monotonic()
        container = self._create(started)
        if container is None:
            return
        spec, running_container = container
        container_id = f"{self.runtime.name}://{running_container.id}"
        run_started = now()
        self.reporter.report(
            self.pod, started=started, state=running(run_started), phase="Running", container_id=container_id
        )
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        grace = min(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_GRACE_SECONDS)
        reason = None
        while (exit_code := running_container.wait(POLL_SECONDS)) is None:
            if self._kill.is_set():
                reason = "Killed"
            elif deadline is not None and time.monotonic() - t0 > float(deadline):
                reason = "DeadlineExceeded"
            if reason:
                exit_code = running_container.stop(grace)
                break
        if reason == "Killed" and not self.deleted:
            return  # the harness is stopping: leave the pod's status alone
        message = running_container.termination_message() or self._fallback_message(spec, exit_code)
        pod_reason = pod_message = None
        if reason == "DeadlineExceeded":
            pod_reason = "DeadlineExceeded"
            pod_message = f"Pod was active on the node longer than the specified deadline ({deadline}s)"
        self.reporter.report(
            self.pod,
            started=started,
            state=terminated(exit_code, started_at=run_started, container_id=container_id, message=message),
            phase="Succeeded" if exit_code == 0 and reason is None else "Failed",
            container_id=container_id,
            reason=pod_reason,
            message=pod_message,
        )

    def _create(self, started: str) -> tuple[ContainerSpec, RunningContainer] | None:
        """Resolves and starts the container, waiting while it cannot be created; None when it did not start."""
        while True:
            try:
                spec = self.resolve(self.pod)
                self.log_file = spec.log_file
                return spec, self.runtime.start(spec)
            except ContainerCreateError as e:
                self.reporter.report(self.pod, started=started, state=waiting(e.reason, e.message), phase="Pending")
            except ContainerStartError as e:
                state = terminated(START_ERROR_EXIT_CODE, started_at=now(), message=str(e), reason="StartError")
                self.reporter.report(self.pod, started=started, state=state, phase="Failed")
                return None
            if self._kill.wait(CREATE_RETRY_SECONDS):
                return None

    def _fallback_message(self, spec: ContainerSpec, exit_code: int) -> str:
        policy = self.pod["spec"]["containers"][0].get("terminationMessagePolicy")
        if exit_code == 0 or policy != "FallbackToLogsOnError":
            return ""
        lines = spec.log_file.read_text(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
        return "\n".join(lines)[-FALLBACK_LOG_BYTES:]
