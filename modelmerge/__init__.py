"""ModelMerge: streaming LLM merging as Kubernetes workloads or on one machine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelmerge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
