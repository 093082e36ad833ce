"""Shared pytest configuration: the control-plane fixtures live in tests/kube/fixtures.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests reaches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.kube.fixtures"]
