"""Where a benchmark ran: commit, package versions, CPU model and core count, memory, kernel; where its results go;
and how runs are summed up (median and spread). Every bench_*.py records this beside its raw rows in
bench/results/*.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SMOKE_RESULTS = ROOT / ".bench" / "results"


def package_version(name: str, python: str | None = None) -> str | None:
    """The installed version of `name` here, or in the environment of another interpreter."""
    if python is None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    result = subprocess.run([python, "-c", f"from importlib import metadata; print(metadata.version({name!r}))"],
                            capture_output=True, text=True)
    return result.stdout.strip() or None


def memory_total_bytes() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:"))


def provenance(packages: list[str], **other_packages: str | None) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    # results files other benchmarks just wrote (bench/results/) are not changes to what is measured
    changes = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(changes),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_model": cpu,
            "cpu_cores": len(os.sched_getaffinity(0)), "memory_bytes": memory_total_bytes(),
            "kernel": platform.release(), "python": platform.python_version(),
            "packages": {**{name: package_version(name) for name in ["modelmerge", *packages]}, **other_packages}}


def results_path(name: str, *, recorded: bool) -> Path:
    """bench/results/<name>.json for a run with the recorded settings, .bench/results/<name>-smoke.json else
    (smoke runs are never committed as results)."""
    return RESULTS / f"{name}.json" if recorded else SMOKE_RESULTS / f"{name}-smoke.json"


def write_results(result: dict, out: Path) -> None:
    """Writes a benchmark's raw rows, summary and provenance as JSON and says where on stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"raw rows and provenance: {out}", file=sys.stderr)


def median_spread(values: list[float]) -> dict[str, float]:
    """The median and the range of several runs' values (what the tables print as `median (min-max)`)."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}
