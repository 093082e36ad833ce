"""The ModelMerge REST facade: one FastAPI app over two backends (local SQLite + subprocesses, Kubernetes CRs).

`modelmerge serve` builds it through `modelmerge_api.server`."""
