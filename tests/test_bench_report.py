"""bench/report.py: the README's engine and methods tables from a recording plus later recordings of some of its
methods and fine-tune counts."""

from __future__ import annotations

import json

from bench import report

TOOLS = ["ours", "merging-eval", "mergekit"]
MIB = 1 << 20


def _engine(results):
    return report.combined_results(results, name="engine", order=tuple(report.ENGINE_TARGETS))


def _cell(method: str, tool: str, state: str, seconds: float, *, finetunes: int = 2) -> dict:
    measure = {"median": seconds, "min": seconds, "max": seconds}
    memory = {"median": 100 * MIB, "min": 100 * MIB, "max": 100 * MIB}
    return {"method": method, "finetunes": finetunes, "state": state, "tool": tool, "runs": 5, "ok": 5,
            "seconds": measure, "rss_anon_peak_bytes": memory, "rss_peak_bytes": memory, "cgroup_peak_bytes": memory}


def _recording(path, *, commit: str, date: str, methods: list[str], limit_methods: list[str], ours: float,
               disk: dict | None = None, finetunes: tuple[int, ...] = (2,), tools: list[str] = TOOLS) -> None:
    states = ["warm", "cold"]
    cells = [_cell(m, tool, state, ours if tool == "ours" else 40.0, finetunes=n) for m in methods for n in finetunes
             for tool in tools for state in states]
    ratios = [{"method": m, "finetunes": n, "state": state, "fastest_peer": "mergekit", "speedup": 40.0 / ours,
               "rss_anon_peak_bytes_ratio": 1.0} for m in methods for n in finetunes for state in states]
    rows = [{"kind": "limit", "tool": tool, "method": m, "finetunes": n, "state": "warm", "run": 0,
             "limit_bytes": 256 * MIB, "outcome": "ok" if tool == "ours" else "killed", "seconds": ours}
            for m in limit_methods for n in finetunes for tool in tools]
    result = {"provenance": {"commit": commit, "date": date, "cpu_model": "CPU", "cpu_cores": 2,
                             "memory_bytes": 24 << 30, "kernel": "6", "packages": {"modelmerge": "0.1.0"}},
              "settings": {"methods": methods, "tools": tools, "finetunes": list(finetunes), "states": states,
                           "runs": 5, "seed": 7, "limits": [256 * MIB], "limit_methods": limit_methods,
                           "input_bytes": {"2": 3_000_000_000}},
              "summary": {"cells": cells, "ratios": ratios}, "rows": rows}
    if disk is not None:
        result["disk"] = disk
    path.write_text(json.dumps(result))


def test_each_method_comes_from_its_newest_recording(tmp_path):
    _recording(tmp_path / "engine.json", commit="a" * 40, date="2026-12-02T10:00:00+00:00",
               methods=["task_arithmetic", "mask_merging"], limit_methods=["task_arithmetic", "mask_merging"], ours=8.0)
    disk = {"start": {"read": {"bytes_per_second": 1_000_000_000, "files": 3},
                      "write": {"bytes_per_second": 1_000_000_000, "bytes": 1_000_000_000}}}
    _recording(tmp_path / "engine-mask.json", commit="b" * 40, date="2026-12-03T10:00:00+00:00",
               methods=["mask_merging"], limit_methods=["mask_merging"], ours=4.0, disk=disk)
    combined = _engine(tmp_path)

    assert combined["settings"]["methods"] == ["task_arithmetic", "mask_merging"]
    ours = {(c["method"], c["state"]): c["seconds"]["median"] for c in combined["summary"]["cells"]
            if c["tool"] == "ours"}
    assert ours == {("task_arithmetic", "warm"): 8.0, ("task_arithmetic", "cold"): 8.0,
                    ("mask_merging", "warm"): 4.0, ("mask_merging", "cold"): 4.0}
    assert {(r["method"], r["seconds"]) for r in combined["rows"]} == {("task_arithmetic", 8.0), ("mask_merging", 4.0)}
    assert len(combined["rows"]) == 6  # one limit row per tool and method, none twice

    table = report.engine_table(combined)
    assert "| task_arithmetic | 2 | cold | 8.00 (8.00–8.00) |" in table and "5.0× (3×)" in table
    assert "| mask_merging | 2 | cold | 4.00 (4.00–4.00) |" in table and "10.0× (8×)" in table
    assert table.count("`aaaaaaa` |") == 2 and table.count("`bbbbbbb` |") == 2
    assert "- timings of task_arithmetic (2 fine-tunes); memory limits of task_arithmetic (2 fine-tunes): Recorded " \
           "2026-12-02 at commit `aaaaaaaaaa`" in table
    assert "- timings of mask_merging (2 fine-tunes); memory limits of mask_merging (2 fine-tunes): Recorded " \
           "2026-12-03 at commit `bbbbbbbbbb`" in table
    assert "not probed in this recording" in table and "takes 4.00 s" in table
    limits = report.limits_table(combined)
    assert "| ours | mask_merging | 2 | ok 4.0 s |" in limits and "| ours | task_arithmetic | 2 | ok 8.0 s |" in limits


def test_a_recording_superseded_for_every_method_is_not_listed(tmp_path):
    _recording(tmp_path / "engine.json", commit="a" * 40, date="2026-12-02T10:00:00+00:00",
               methods=["mask_merging"], limit_methods=["mask_merging"], ours=8.0)
    _recording(tmp_path / "engine-mask.json", commit="b" * 40, date="2026-12-03T10:00:00+00:00",
               methods=["mask_merging"], limit_methods=["mask_merging"], ours=4.0)
    combined = _engine(tmp_path)
    assert [s["recording"]["provenance"]["commit"][0] for s in combined["sources"]] == ["b"]
    assert "`aaaaaaaaaa`" not in report.engine_table(combined)


def test_no_recording_says_how_to_make_one(tmp_path):
    assert _engine(tmp_path) is None
    assert "make bench-engine" in report.engine_table(None)


def test_a_newer_recording_of_some_fine_tune_counts_keeps_the_others(tmp_path):
    """A method re-recorded with 2 fine-tunes keeps its 8-fine-tune rows from the older recording, each row naming
    the commit it was recorded at; a suite recorded in parts (methods-*.json) is one table."""
    _recording(tmp_path / "methods-gta.json", commit="a" * 40, date="2026-12-02T10:00:00+00:00",
               methods=["ties", "dare_ties"], limit_methods=["ties"], ours=8.0, finetunes=(2, 8),
               tools=["ours", "mergekit"])
    _recording(tmp_path / "methods-ties.json", commit="b" * 40, date="2026-12-03T10:00:00+00:00",
               methods=["ties"], limit_methods=[], ours=4.0, tools=["ours", "mergekit"])
    _recording(tmp_path / "methods-slerp.json", commit="c" * 40, date="2026-12-04T10:00:00+00:00",
               methods=["slerp"], limit_methods=["slerp"], ours=2.0, finetunes=(1,), tools=["ours", "mergekit"])
    (tmp_path / "methodsextra.json").write_text("not a recording")  # not methods.json nor methods-*.json
    combined = report.combined_results(tmp_path, name="methods")

    assert combined["settings"]["methods"] == ["ties", "dare_ties", "slerp"]
    assert combined["settings"]["finetunes"] == [1, 2, 8]
    ours = {(c["method"], c["finetunes"], c["state"]): c["seconds"]["median"] for c in combined["summary"]["cells"]
            if c["tool"] == "ours"}
    assert ours[("ties", 2, "cold")] == 4.0 and ours[("ties", 8, "cold")] == 8.0
    assert ours[("dare_ties", 2, "cold")] == 8.0 and ours[("slerp", 1, "warm")] == 2.0
    assert len(combined["summary"]["ratios"]) == len({k for k in ours})  # one ratio per cell, none twice
    assert {(r["method"], r["finetunes"], r["seconds"]) for r in combined["rows"] if r["tool"] == "ours"} == {
        ("ties", 2, 8.0), ("ties", 8, 8.0), ("slerp", 1, 2.0)}

    table = report.methods_table(combined)
    assert "| ties | 2 | cold | 4.00 (4.00–4.00) | 40.00 (40.00–40.00) | 10.0× |" in table
    assert "| ties | 8 | cold | 8.00 (8.00–8.00) | 40.00 (40.00–40.00) | 5.0× |" in table
    assert table.count("`aaaaaaa` |") == 6 and table.count("`bbbbbbb` |") == 2 and table.count("`ccccccc` |") == 2
    assert "- timings of ties (8 fine-tunes), dare_ties (2, 8 fine-tunes); memory limits of ties (2, 8 " \
           "fine-tunes): Recorded 2026-12-02" in table
    assert "- timings of slerp (1 fine-tune); memory limits of slerp (1 fine-tune): Recorded 2026-12-04" in table
    assert "| ours | slerp | 1 | ok 2.0 s |" in report.limits_table(combined, name="methods")


def test_a_recording_without_memory_limit_runs_says_so_instead_of_an_empty_table():
    text = report.limits_table({"rows": [{"kind": "timing"}]}, name="methods")
    assert text.startswith("_No memory-limit runs recorded yet") and "bench/results/methods*.json" in text
    assert "| tool |" not in text
