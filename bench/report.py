"""The README's measured-performance tables, generated from the recorded runs in bench/results/*.json.

    .venv/bin/python bench/report.py            # print the tables
    .venv/bin/python bench/report.py --write    # replace them in README.md, between the bench-report markers
    .venv/bin/python bench/report.py --check    # exit 1 if README.md differs from what the results give

Each table sits between `<!-- bench-report:NAME -->` and `<!-- /bench-report:NAME -->` (NAME: engine, memory,
limits, operator, api, sweep, eval, methods, methods-limits); nothing else in the README is touched. A missing
results file gives a line saying how to record it. The engine tables combine engine.json with later recordings of
some of its methods (engine-*.json, `bench_engine.py --methods ... --out bench/results/engine-NAME.json`), and the
methods tables methods.json with methods-*.json (the mergekit suite recorded in parts): each method and fine-tune
count from its newest recording, each row naming the commit it was recorded at.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.disk import describe, io_floor_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
MIB = 1 << 20
ENGINE_TARGETS = {"average_merging": 3.0, "task_arithmetic": 3.0, "ties_merging": 8.0, "ties_merging_dare": 8.0,
                  "mask_merging": 8.0}


def _load(name: str, results: Path) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _missing(name: str, command: str) -> str:
    return f"_No recorded run yet: `{command}` writes `bench/results/{name}.json`, then `make bench-report`._"


def _provenance(result: dict) -> str:
    p = result["provenance"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(p["packages"].items()) if v)
    return (f"Recorded {p['date'][:10]} at commit `{p['commit'][:10]}`"
            f"{' (with uncommitted changes)' if p.get('uncommitted_changes') else ''} on {p['cpu_model']}, "
            f"{p['cpu_cores']} cores, {p['memory_bytes'] / 2**30:.0f} GiB, Linux {p['kernel']}; {packages}.")


def _disk(result: dict) -> str:
    """What the disk read and wrote at during the recording, and the least time a cold run needs at that rate."""
    disk = result.get("disk")
    if not disk:
        return "The disk's throughput was not probed in this recording (bench/disk.py probes it since)."
    if "read" not in disk.get("start", {}):
        return f"The disk could not be probed: {disk.get('start', {}).get('unavailable', 'no probe')}."

    start = disk["start"]
    count = min(result["settings"]["finetunes"])
    read_bytes = result["settings"]["input_bytes"][str(count)]
    write_bytes = start["write"]["bytes"]
    floor = io_floor_seconds(start, read_bytes=read_bytes, write_bytes=write_bytes)
    return (f"Disk (O_DIRECT, past the page cache, {start['read']['files']} input files read at once; bench/disk.py): "
            f"{describe(start)} at the start, {describe(disk.get('end', {}))} at the end. Reading the inputs of "
            f"{count} fine-tunes ({read_bytes / 1e9:.2f} GB) and writing one output ({write_bytes / 1e9:.2f} GB) at "
            f"the start's rates takes {floor:.2f} s: no cold run on this disk can be faster.")


def _spread(cell: dict, name: str, scale: float = 1.0, digits: int = 2) -> str:
    if name not in cell:
        return "failed" if cell.get("runs") else "-"
    m = cell[name]
    return f"{m['median'] / scale:.{digits}f} ({m['min'] / scale:.{digits}f}–{m['max'] / scale:.{digits}f})"


def _summary_by_key(result: dict) -> tuple[dict[tuple, dict], dict[tuple, dict]]:
    """bench_engine's summary cells by (method, fine-tunes, state, tool) and ratios by (method, fine-tunes, state)."""
    cells = {(c["method"], c["finetunes"], c["state"], c["tool"]): c for c in result["summary"]["cells"]}
    ratios = {(r["method"], r["finetunes"], r["state"]): r for r in result["summary"]["ratios"]}
    return cells, ratios


def combined_results(results: Path, *, name: str, order: tuple[str, ...] = ()) -> dict | None:
    """`name`.json and its later recordings of some methods (`name`-*.json, e.g. the methods an engine change
    affected, re-recorded with every peer in the same run, or a suite recorded in parts), as one result: each
    (method, fine-tune count)'s cells and ratios, and its memory-limit rows, come from the newest recording that has
    them; `sources` says which recording gave what. Methods in `order` come first, in that order."""
    recordings = sorted((json.loads(p.read_text()) for p in results.glob(f"{name}*.json")
                         if re.fullmatch(rf"{re.escape(name)}(-[\w.-]+)?\.json", p.name)),
                        key=lambda r: r["provenance"]["date"])
    if not recordings:
        return None
    timed: dict[tuple[str, int], dict] = {}
    limited: dict[tuple[str, int], dict] = {}
    for recording in recordings:
        timed.update({(c["method"], c["finetunes"]): recording for c in recording["summary"]["cells"]})
        limited.update({(r["method"], r["finetunes"]): recording for r in recording["rows"] if r["kind"] == "limit"})
    seen = list(dict.fromkeys(method for method, _ in timed))
    methods = [m for m in order if m in seen] + [m for m in seen if m not in order]
    keys = sorted(timed, key=lambda key: (methods.index(key[0]), key[1]))
    summary = {part: [entry for key in keys for entry in timed[key]["summary"][part]
                      if (entry["method"], entry["finetunes"]) == key] for part in ("cells", "ratios")}
    rows = [row for key, recording in limited.items() for row in recording["rows"]
            if row["kind"] == "limit" and (row["method"], row["finetunes"]) == key]
    sources = [{"recording": r, "timed": [k for k in keys if timed[k] is r],
                "limited": [k for k in limited if limited[k] is r]} for r in recordings]
    return {"sources": [s for s in sources if s["timed"] or s["limited"]], "summary": summary, "rows": rows,
            "settings": {"methods": methods,
                         "tools": list(dict.fromkeys(t for r in recordings for t in r["settings"]["tools"])),
                         "finetunes": sorted({key[1] for key in timed}),
                         "states": list(dict.fromkeys(s for r in recordings for s in r["settings"]["states"]))}}


def _methods_with_counts(keys: list[tuple[str, int]]) -> str:
    """(method, fine-tune count) keys as "ties (2, 8 fine-tunes), slerp (1 fine-tune)"."""
    counts: dict[str, list[int]] = {}
    for method, count in keys:
        counts.setdefault(method, []).append(count)
    return ", ".join(f"{method} ({', '.join(map(str, sorted(c)))} fine-tune{'s' if c != [1] else ''})"
                     for method, c in counts.items())


def _source(source: dict) -> str:
    """One recording behind a combined table: what it gave, where and how it ran."""
    recording, settings = source["recording"], source["recording"]["settings"]
    gave = "; ".join(filter(None, [f"timings of {_methods_with_counts(source['timed'])}" if source["timed"] else "",
                                   f"memory limits of {_methods_with_counts(source['limited'])}"
                                   if source["limited"] else ""]))
    return (f"- {gave}: {_provenance(recording)} {_disk(recording)} {settings['runs']} runs per cell, every tool in "
            f"one shuffled order (seed {settings['seed']}).")


def _commits(result: dict) -> dict[tuple[str, int], str]:
    """The short commit each (method, fine-tune count) of a combined result was recorded at."""
    return {key: source["recording"]["provenance"]["commit"][:7] for source in result["sources"]
            for key in source["timed"]}


def engine_table(result: dict | None) -> str:
    if result is None:
        return _missing("engine", "make bench-engine")
    settings = result["settings"]
    cells, ratios = _summary_by_key(result)
    tools = settings["tools"]
    commit_of = _commits(result)
    lines = ["Recordings (each method and fine-tune count from its newest; every peer ran in the same recording as "
             "ours):",
             *(_source(source) for source in result["sources"]), "",
             "Median (min–max) seconds; speed-up = fastest peer's median / ours; memory = peak of the run's memory "
             "cgroup (anonymous memory + page cache, what a pod's limit counts), with RssAnon and total RSS in "
             "`bench/results/engine*.json`. Targets: ≥ 3× on average/task arithmetic, ≥ 8× on TIES, DARE and mask "
             "merging, cold.", "",
             "| method | fine-tunes | state | " + " | ".join(f"{t} s" for t in tools)
             + " | speed-up (target) | " + " | ".join(f"{t} cgroup MiB" for t in tools) + " | recorded at |",
             "|" + " --- |" * (3 + 2 * len(tools) + 2)]
    for method in settings["methods"]:
        for count in settings["finetunes"]:
            for state in settings["states"]:
                row = [cells.get((method, count, state, t), {}) for t in tools]
                if not any(row):
                    continue
                ratio = ratios.get((method, count, state), {})
                speedup = f"{ratio['speedup']:.1f}× ({ENGINE_TARGETS[method]:g}×)" if "speedup" in ratio else "-"
                lines.append(f"| {method} | {count} | {state} | "
                             + " | ".join(_spread(c, "seconds") for c in row) + f" | {speedup} | "
                             + " | ".join(_spread(c, "cgroup_peak_bytes", MIB, 0) for c in row)
                             + f" | `{commit_of[(method, count)]}` |")
    return "\n".join(lines)


def memory_table(result: dict | None) -> str:
    if result is None:
        return _missing("engine", "make bench-engine")
    cells = [c for c in result["summary"]["cells"] if c["state"] == "warm"]
    lines = ["Peak memory of the warm runs, median MiB: RssAnon (what the processes allocated), total RSS (plus the "
             "file pages they map: inputs and libraries) and the cgroup's peak (anonymous memory plus all page "
             "cache the run brought in or wrote, what a pod's memory limit counts).", "",
             "| method | fine-tunes | tool | RssAnon | RSS | cgroup peak |", "| --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        lines.append(f"| {c['method']} | {c['finetunes']} | {c['tool']} | "
                     + " | ".join(_spread(c, name, MIB, 0) for name in
                                  ("rss_anon_peak_bytes", "rss_peak_bytes", "cgroup_peak_bytes")) + " |")
    return "\n".join(lines)


def limits_table(result: dict | None, *, name: str = "engine") -> str:
    if result is None:
        return _missing(name, f"make bench-{name}")
    rows = [r for r in result["rows"] if r["kind"] == "limit"]
    if not rows:  # recorded with --limits '' so far
        return (f"_No memory-limit runs recorded yet: `bench/bench_engine.py` with `--limits` (its default) records "
                f"them into `bench/results/{name}*.json`, then `make bench-report`._")
    limits = sorted({r["limit_bytes"] for r in rows})
    by_key = {(r["tool"], r["method"], r["finetunes"], r["limit_bytes"]): r for r in rows}
    lines = ["Each tool under a memory cgroup limit (as a pod's `resources.limits.memory`), page cache warm: "
             "succeeded with its wall time, or killed by the OOM killer.", "",
             "| tool | method | fine-tunes | " + " | ".join(f"{limit / MIB:g} MiB" for limit in limits) + " |",
             "|" + " --- |" * (3 + len(limits))]
    for tool, method, count in sorted({k[:3] for k in by_key}):
        outcomes = []
        for limit in limits:
            r = by_key.get((tool, method, count, limit))
            outcomes.append("-" if r is None else f"ok {r['seconds']:.1f} s" if r["outcome"] == "ok"
                            else f"{r['outcome']} after {r['seconds']:.1f} s")
        lines.append(f"| {tool} | {method} | {count} | " + " | ".join(outcomes) + " |")
    return "\n".join(lines)


METHODS_TARGETS = {"speedup": 5.0, "anon_ratio": 4.0}  # issue 11: >= 5x faster cold, <= 1/4 of the anonymous memory


def methods_table(result: dict | None) -> str:
    if result is None:
        return _missing("methods", "make bench-methods")
    settings = result["settings"]
    cells, ratios = _summary_by_key(result)
    commit_of = _commits(result)
    lines = ["Recordings (each method and fine-tune count from its newest; mergekit ran in the same recording as "
             "ours):", *(_source(source) for source in result["sources"]), "",
             "mergekit's methods, this engine (`modelmerge merge --config`) and mergekit (`mergekit-yaml`) given the "
             "same YAML; median (min–max) seconds and peak RssAnon MiB; speed-up = mergekit's median / ours (target ≥ "
             f"{METHODS_TARGETS['speedup']:g}× cold), anon = mergekit's RssAnon / ours (target ≥ "
             f"{METHODS_TARGETS['anon_ratio']:g}×). Two-model methods read their fixed fine-tunes (slerp, nearswap, "
             "passthrough: base + 1; nuslerp: 2). Total RSS and cgroup peaks in `bench/results/methods*.json`.", "",
             "| method | fine-tunes | state | ours s | mergekit s | speed-up | ours RssAnon | mergekit RssAnon "
             "| anon | recorded at |",
             "|" + " --- |" * 10]
    for method in settings["methods"]:
        for count in settings["finetunes"]:
            for state in settings["states"]:
                ours, theirs = cells.get((method, count, state, "ours"), {}), cells.get((method, count, state,
                                                                                         "mergekit"), {})
                if not (ours or theirs):
                    continue
                ratio = ratios.get((method, count, state), {})
                speedup = f"{ratio['speedup']:.1f}×" if "speedup" in ratio else "-"
                anon = f"{ratio['rss_anon_peak_bytes_ratio']:.1f}×" if "speedup" in ratio else "-"
                lines.append(f"| {method} | {count} | {state} | {_spread(ours, 'seconds')} | "
                             f"{_spread(theirs, 'seconds')} | {speedup} | "
                             f"{_spread(ours, 'rss_anon_peak_bytes', MIB, 0)} | "
                             f"{_spread(theirs, 'rss_anon_peak_bytes', MIB, 0)} | {anon} | "
                             f"`{commit_of[(method, count)]}` |")
    return "\n".join(lines)


def operator_table(result: dict | None) -> str:
    if result is None:
        return _missing("operator", "make bench-operator")
    s = result["summary"]
    lines = [_provenance(result),
             f"{result['settings']['count']} ModelMerges created at once, {len(result['rows'])} runs, median "
             "(min–max) seconds from the first create; target: all Jobs within "
             f"{result['settings']['target_jobs_s']:g} s.", "",
             "| milestone | seconds |", "| --- | --- |"]
    for name, label in (("jobs_s", "all Jobs exist (operator)"), ("direct_jobs_s", "same Jobs created directly "
                                                                  "(the API server's floor)"),
                        ("pods_s", "all pods exist"), ("running_s", "all ModelMerges Running"),
                        ("succeeded_s", "all ModelMerges Succeeded")):
        if name in s:
            lines.append(f"| {label} | {_spread({'x': s[name]}, 'x')} |")
    return "\n".join(lines)


def api_table(result: dict | None) -> str:
    if result is None:
        return _missing("api", "make bench-api")
    s = result["settings"]
    lines = [_provenance(result),
             f"{s['jobs']} jobs recorded, {s['clients']} concurrent keep-alive clients in a separate process, "
             f"{s['requests']} requests per run, {s['runs']} runs; median (min–max) of the runs' p50/p99 in ms. "
             "`merging`: merges run through the API during the measurement.", "",
             "| backend | load | endpoint | p50 ms | p99 ms | req/s | p99 target |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for cell in result["summary"]:
        lines.append(f"| {cell['backend']} | {cell['load']} | `{cell['endpoint']}` | {_spread(cell, 'p50_ms', 1, 1)} | "
                     f"{_spread(cell, 'p99_ms', 1, 1)} | {_spread(cell, 'throughput_rps', 1, 0)} | "
                     f"{cell['target_p99_ms']:g} ms |")
    return "\n".join(lines)


def sweep_table(result: dict | None) -> str:
    if result is None:
        return _missing("sweep", "make bench-sweep")
    s, settings = result["summary"], result["settings"]
    lines = [_provenance(result) + f" Load average (1, 5, 15 min) at the start {settings['load_average']['start']}, "
             f"at the end {settings['load_average']['end']} (per run in `bench/results/sweep.json`); niceness "
             f"{settings['nice']}."]
    control = s.get("control")
    if control:
        lines += ["", f"A ModelMergeSweep of {settings['trials']} trials (parallelism {settings['parallelism']}) "
                  "on the test control plane, the merge pods a stand-in engine run by the test kubelet; "
                  f"{control['runs']} run(s), median (min–max). Status lag: from a child ModelMerge seen finished to "
                  "the sweep's status showing that trial finished.", "",
                  "| measure | value |", "| --- | --- |",
                  f"| sweeps Succeeded | {control['succeeded']}/{control['runs']} |",
                  f"| most children unfinished at once | {control['most_unfinished']} (parallelism "
                  f"{settings['parallelism']}: {'kept' if control['parallelism_kept'] else 'EXCEEDED'}) |"]
        if "sweep_s" in control:
            lines.append(f"| whole sweep, s | {_spread({'x': control['sweep_s']}, 'x')} |")
        for q in ("median", "p99", "max"):
            if f"status_lag_{q}_s" in control:
                lines.append(f"| status lag {q}, s | {_spread({'x': control[f'status_lag_{q}_s']}, 'x')} |")
    if s.get("local"):
        models = settings["models"]
        lines += ["", f"A 9-point grid (ties_merging_dare, scaling_coefficient {settings['grid'][0]}–"
                  f"{settings['grid'][-1]}, evaluation with baselines, {settings['records']} records) on chat models "
                  f"of hidden size {models['hidden']} and {models['layers']} layers with {models['finetunes']} "
                  "fine-tunes, through the local backend (one worker, parallelism 1) with and without the work "
                  "cache, against the same points run by hand (9 `modelmerge merge` + 9 `modelmerge eval`, and the "
                  "base and fine-tunes evaluated once each); median (min–max) seconds.", "",
                  "| case | total s | per trial s | speed-up vs by hand |", "| --- | --- | --- | --- |"]
        for cell in s["local"]:
            lines.append(f"| {cell['case']} | {_spread(cell, 'seconds', 1, 1)} | {_spread(cell, 'per_trial_s')} | "
                         f"{cell.get('vs_separate', '-')}× |")
    return "\n".join(lines)


def eval_table(result: dict | None, gpu: dict | None) -> str:
    if result is None:
        return _missing("eval", ".venv/bin/python bench/bench_eval.py")
    lines = []
    for recorded in (result, gpu):
        if recorded is None:
            continue
        s, settings = recorded["summary"], recorded["settings"]
        device = "a GPU (bfloat16)" if settings["use_gpu"] else "the CPU (float32)"
        lines += [_provenance(recorded), "",
                  f"Shape `{settings['shape']}`, {settings['records']} records, max_length {settings['max_length']}, "
                  f"on {device}; merging-eval's loop pads every record to max_length in batches of 10, ours sorts by "
                  f"length in batches of up to {settings['batch_size']}; {settings['runs']} runs alternating who "
                  "goes first, each in a fresh process, median (min–max).", "",
                  "| tool | answer tokens/s | loop s | peak RSS GiB | cross-entropy |",
                  "| --- | --- | --- | --- | --- |"]
        for tool in ("ours", "merging-eval"):
            cell = s[tool]
            lines.append(f"| {tool} | {_spread(cell, 'tokens_per_second', 1, 1)} | {_spread(cell, 'eval_seconds')} | "
                         f"{_spread(cell, 'peak_rss_bytes', 2**30)} | {cell['ce']['median']:.6f} |")
        lines += ["", f"Speed-up (run by run) {_spread({'x': s['speedup']}, 'x')}×, peak memory "
                  f"{s['memory_ratio']:.2f}× lower; the cross-entropies agree to {s['ce_relative_difference']:.1e} "
                  f"(relative) over {s['ours']['tokens']['median']} answer tokens.", ""]
    return "\n".join(lines).rstrip("\n")


def sections(results: Path) -> dict[str, str]:
    engine = combined_results(results, name="engine", order=tuple(ENGINE_TARGETS))
    methods = combined_results(results, name="methods")
    return {"engine": engine_table(engine), "memory": memory_table(engine), "limits": limits_table(engine),
            "operator": operator_table(_load("operator", results)), "api": api_table(_load("api", results)),
            "sweep": sweep_table(_load("sweep", results)),
            "eval": eval_table(_load("eval", results), _load("eval-gpu", results)),
            "methods": methods_table(methods), "methods-limits": limits_table(methods, name="methods")}


def render(readme: str, tables: dict[str, str]) -> str:
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- bench-report:{name} -->\n).*?(<!-- /bench-report:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- bench-report:{name} --> ... <!-- /bench-report:{name} --> "
                             "markers")
        readme = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update README.md in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of engine.json, operator.json, api.json (default: bench/results)")
    args = parser.parse_args()
    tables = sections(args.results)
    if not (args.write or args.check):
        print("\n\n".join(tables.values()))
        return 0
    current = README.read_text()
    updated = render(current, tables)
    if args.check:
        if updated != current:
            print("README.md's measured-performance tables differ from bench/results: run make bench-report",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
