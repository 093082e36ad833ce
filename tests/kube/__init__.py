"""Test support for the real Kubernetes API: the envtest control plane (controlplane.py), a kubelet stand-in
that runs pods as local processes (kubelet.py) and the pytest fixtures that wire them up (fixtures.py)."""
