"""Test support for the real Kubernetes API: the envtest control plane (controlplane.py), the test kubelet that
schedules and runs its pods (kubelet/, on a container runtime: local processes by default) and the pytest fixtures
that wire them up (fixtures.py)."""
