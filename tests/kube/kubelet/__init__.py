"""The test kubelet: runs the pods of the envtest control plane, which has no kubelet and no scheduler.

* harness.py: ``FakeKubelet``, the Node, the pod watch, and what happens to each pod;
* scheduling.py: binding pods that fit the Node, Unschedulable for the others;
* containers.py, volumes.py, references.py: a pod's container resolved into a ``ContainerSpec`` (env, mounts
  from volumes, security context, limits), reading the ConfigMaps, Secrets and tokens it refers to;
* runtime.py: the container runtime interface; process.py: the process runtime (a container as a local
  process); pod_worker.py: one pod from creation to its end on a runtime;
* status.py: pod status through ``pods/status``; logserver.py: ``/containerLogs`` over HTTPS for the API server.
"""

from tests.kube.kubelet.harness import FakeKubelet
from tests.kube.kubelet.process import ProcessRuntime
from tests.kube.kubelet.runtime import (
    ContainerCreateError,
    ContainerRuntime,
    ContainerSpec,
    ContainerStartError,
    Mount,
    ResourceLimits,
    RunningContainer,
    SecurityContext,
    UnsupportedPod,
)

__all__ = [
    "ContainerCreateError",
    "ContainerRuntime",
    "ContainerSpec",
    "ContainerStartError",
    "FakeKubelet",
    "Mount",
    "ProcessRuntime",
    "ResourceLimits",
    "RunningContainer",
    "SecurityContext",
    "UnsupportedPod",
]
