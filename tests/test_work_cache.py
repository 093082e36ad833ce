"""The work cache (`modelmerge merge --work-cache DIR`, MODELMERGE_WORK_CACHE): ties_merging_dare's global
statistics and the baselines' evaluations reused between merges of the same inputs, with real merges of tiny chat
models on real data files: reuse gives bit-identical outputs and equal evaluations, any change of what an entry
depends on misses, corrupt entries are ignored with a warning, concurrent merges share one cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modelmerge.contract import MergeRequest
from modelmerge_engine.run import run_merge
from modelmerge_engine.work_cache import WORK_CACHE_ENV, WorkCache
from tests.helpers.eval_data import make_chat_finetune, make_chat_model, make_records, write_records

SIZE = {"hidden": 32, "intermediate": 64}
THRESHOLDS_REUSED = "reused ties_merging_dare thresholds and majority sign"
BASELINE_REUSED = "reused the evaluation of"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("work-cache-models")
    base = make_chat_model(root / "base", **SIZE)
    return base, [make_chat_finetune(base, root / f"ft{i}", seed=60 + i, scale=0.05) for i in range(2)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("work-cache-data") / "code.json", make_records(6, seed=3))


def request(family, output: Path, data: Path | None = None, **fields) -> MergeRequest:
    base, finetunes = family
    evaluation = {"data": [str(data)], "baselines": True, "max_length": 64} if data else None
    return MergeRequest(base_model=str(base), models_to_merge=[str(f) for f in finetunes],
                        merge_method=fields.pop("merge_method", "ties_merging_dare"), output_dir=str(output),
                        evaluation=evaluation, **{"scaling_coefficient": 0.5, "param_value_mask_rate": 0.3, **fields})


def merge(req: MergeRequest, capfd, cache: Path | None = None) -> tuple[dict, str]:
    """The merge run in this process; its report and what it wrote on stderr."""
    capfd.readouterr()
    assert run_merge(req, progress="lines", work_cache=cache) == 0
    log = capfd.readouterr().err
    return json.loads((Path(req.output_dir) / "merge_report.json").read_text()), log


def weights(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.glob("*.safetensors"))}


def evaluations(report: dict) -> dict:
    """The evaluation's results: the merged model's and each baseline's files and overall scores."""
    section = report["evaluation"]
    assert section["state"] == "Succeeded", section["message"]
    scores = lambda r: {"files": r["files"], "overall": r["overall"]}  # noqa: E731
    return {"merged": scores(section["merged"]),
            "baselines": [(b["model"], b["role"], scores(b["report"])) for b in section["baselines"]]}


def entries(cache: Path, kind: str) -> list[Path]:
    return sorted(cache.glob(f"{kind}-*.json"))


def test_reuse_gives_identical_weights_and_evaluations(family, data_file, tmp_path, capfd):
    cache = tmp_path / "cache"
    plain, _ = merge(request(family, tmp_path / "plain", data_file), capfd)
    first, log = merge(request(family, tmp_path / "first", data_file), capfd, cache)
    assert "work cache: reused" not in log
    assert first["work_cache"] == {"directory": str(cache), "reused": []}
    assert len(entries(cache, "ties_merging_dare-statistics")) == 1
    assert len(entries(cache, "evaluation")) == 3  # the base and two fine-tunes

    again, log = merge(request(family, tmp_path / "again", data_file), capfd, cache)
    assert THRESHOLDS_REUSED in log and log.count(BASELINE_REUSED) == 3
    assert set(again["work_cache"]["reused"]) == {
        "ties_merging_dare thresholds and majority sign",
        *(f"the evaluation of {field} {ref}" for field, ref in
          [("base_model", str(family[0]))] + [(f"models_to_merge[{i}]", str(f)) for i, f in enumerate(family[1])])}
    assert weights(tmp_path / "again") == weights(tmp_path / "first") == weights(tmp_path / "plain")
    assert evaluations(again) == evaluations(first) == evaluations(plain)
    assert again["statistics"] == first["statistics"] == plain["statistics"]

    # a trial that differs only in scaling_coefficient reuses all of it, and matches a plain merge of its own
    other, log = merge(request(family, tmp_path / "other", data_file, scaling_coefficient=0.9), capfd, cache)
    assert THRESHOLDS_REUSED in log and log.count(BASELINE_REUSED) == 3
    plain_other, _ = merge(request(family, tmp_path / "plain-other", data_file, scaling_coefficient=0.9), capfd)
    assert weights(tmp_path / "other") == weights(tmp_path / "plain-other") != weights(tmp_path / "plain")
    assert evaluations(other) == evaluations(plain_other)


@pytest.mark.parametrize("change", ["rate", "regex", "dtype", "input"])
def test_what_an_entry_depends_on_misses_when_changed(change, family, tmp_path, capfd):
    cache = tmp_path / "cache"
    merge(request(family, tmp_path / "first"), capfd, cache)
    fields = {"rate": {"param_value_mask_rate": 0.5}, "regex": {"exclude_param_names_regex": ["mlp.down_proj"]},
              "dtype": {"dtype": "float32"}, "input": {}}[change]
    if change == "input":  # the same fine-tune written again: same path, new modification time
        changed = family[1][1] / "model.safetensors"
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        report, log = merge(request(family, tmp_path / "second", **fields), capfd, cache)
    finally:
        if change == "input":
            os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "work cache: reused" not in log and report["work_cache"]["reused"] == []
    assert len(entries(cache, "ties_merging_dare-statistics")) == 2
    plain, _ = merge(request(family, tmp_path / "plain", **fields), capfd)
    assert weights(tmp_path / "second") == weights(tmp_path / "plain")


def test_a_method_whose_statistics_are_not_cached_keeps_working(family, tmp_path, capfd):
    cache = tmp_path / "cache"
    report, log = merge(request(family, tmp_path / "ties", merge_method="ties_merging"), capfd, cache)
    assert report["work_cache"]["reused"] == [] and not list(cache.glob("*.json"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key", "wrong thresholds"])
def test_a_corrupt_entry_is_ignored_with_a_warning(damage, family, tmp_path, capfd):
    cache = tmp_path / "cache"
    merge(request(family, tmp_path / "first"), capfd, cache)
    [entry] = entries(cache, "ties_merging_dare-statistics")
    stored = json.loads(entry.read_text())
    if damage == "garbage":
        entry.write_bytes(b"\x00\xffnot json")
    elif damage == "truncated":
        entry.write_text(entry.read_text()[:40])
    elif damage == "other key":  # an entry of other inputs put at this name
        entry.write_text(json.dumps({**stored, "key": {**stored["key"], "dtype": "float32"}}))
    else:
        entry.write_text(json.dumps({**stored, "value": {"thresholds": [1], "majority_sign": 1}}))
    report, log = merge(request(family, tmp_path / "second"), capfd, cache)
    assert f"warning: ignoring corrupt work cache entry {entry}" in log
    assert "work cache: reused" not in log
    assert weights(tmp_path / "second") == weights(tmp_path / "first")
    assert json.loads(entry.read_text()) == stored  # rewritten whole by the merge that did the work again
    _, log = merge(request(family, tmp_path / "third"), capfd, cache)
    assert THRESHOLDS_REUSED in log and "warning" not in log


def test_concurrent_merges_share_one_cache(family, data_file, tmp_path, capfd):
    """Three merges at once through the CLI (the cache from the environment for one of them, the flag for the
    others), then a fourth: every output equals a merge without the cache, one entry per key, no temporary file
    left, and the fourth reuses all of it."""
    cache = tmp_path / "cache"
    coefficients = [0.2, 0.5, 0.8]
    base, finetunes = family

    def cli(output: Path, coefficient: float, *, from_environment: bool) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != WORK_CACHE_ENV}
        if from_environment:
            env[WORK_CACHE_ENV] = str(cache)
        return subprocess.Popen(
            [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines", "--base-model", str(base),
             "--models-to-merge", ",".join(map(str, finetunes)), "--merge-method", "ties_merging_dare",
             "--scaling-coefficient", str(coefficient), "--param-value-mask-rate", "0.3",
             "--eval-data", str(data_file), "--eval-baselines", "--eval-max-length", "64", "--output-dir",
             str(output), *([] if from_environment else ["--work-cache", str(cache)])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    runs = [cli(tmp_path / f"cached-{c}", c, from_environment=i == 0) for i, c in enumerate(coefficients)]
    for run in runs:
        _, err = run.communicate()
        assert run.returncode == 0, err
    assert len(entries(cache, "ties_merging_dare-statistics")) == 1 and len(entries(cache, "evaluation")) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    for c in coefficients:
        plain, _ = merge(request(family, tmp_path / f"plain-{c}", data_file, scaling_coefficient=c), capfd)
        cached = json.loads((tmp_path / f"cached-{c}" / "merge_report.json").read_text())
        assert weights(tmp_path / f"cached-{c}") == weights(tmp_path / f"plain-{c}")
        assert evaluations(cached) == evaluations(plain) and cached["work_cache"]["directory"] == str(cache)
    _, log = merge(request(family, tmp_path / "last", data_file, scaling_coefficient=0.4), capfd, cache)
    assert THRESHOLDS_REUSED in log and log.count(BASELINE_REUSED) == 3


def test_readers_never_see_half_an_entry(tmp_path, capfd):
    """Writers rewriting one entry while readers load it: every read is absent or whole, never a warning."""
    cache = WorkCache(tmp_path, log=lambda text: None)
    key = {"inputs": "same"}
    value = {"thresholds": list(range(20000)), "majority_sign": 1}
    seen: list[object] = []
    stop = threading.Event()

    def write():
        for _ in range(30):
            cache.store("statistics", key, value)

    def read():
        while not stop.is_set():
            seen.append(cache.load("statistics", key))

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write) for _ in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert "warning" not in capfd.readouterr().err
    assert seen and all(item is None or item == value for item in seen) and value in seen
    assert [p.name for p in tmp_path.iterdir()] == [cache.path("statistics", key).name]


def test_an_unwritable_cache_only_warns(family, tmp_path, capfd):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    report, log = merge(request(family, tmp_path / "out"), capfd, blocked / "cache")
    assert "warning: cannot write work cache entry" in log and report["work_cache"]["reused"] == []
