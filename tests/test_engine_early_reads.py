"""Early reads (early_reads.py): the inputs' first bytes asked of the disk while the engine starts, sized by the
memory cgroup, read from the page cache by the merge while the rest is read as before."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelmerge.contract import MergeRequest
from modelmerge_engine.direct_read import BLOCK, resident_fraction
from modelmerge_engine.early_reads import (
    EARLY_READ_BYTES_ENV,
    LIMIT_SHARE,
    PREFETCH_BYTES,
    ask,
    ask_shared,
    budget_bytes,
    memory_headroom,
)
from modelmerge_engine.engine import INPUT_READS_ENV, RANGE_ELEMENTS_ENV
from modelmerge_engine.run import run_merge
from modelmerge_engine.safetensors_io import SafetensorsModel
from tests.helpers.memory_cgroup import evict_page_cache
from tests.helpers.models import make_family

MiB = 1 << 20


def _cgroup_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")


def _mountinfo(path: Path, mounts: list[tuple[str, Path, str, str]]) -> Path:
    """A mountinfo file of (hierarchy root, mount point, fstype, super options) lines, as /proc/self/mountinfo
    writes them (octal escapes in paths), after an unrelated mount."""
    lines = ["22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw"]
    for number, (root, point, fstype, options) in enumerate(mounts, start=30):
        escaped = str(point).replace("\\", "\\134").replace(" ", "\\040")
        lines.append(f"{number} 22 0:{number} {root} {escaped} rw,nosuid shared:{number} - {fstype} {fstype} "
                     f"{options}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_headroom_is_the_least_left_under_the_process_cgroup_and_those_above_it(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/pods/pod1/merge\n1:cpu:/\n")
    fs = tmp_path / "fs"
    mounts = _mountinfo(tmp_path / "mountinfo", [("/", fs / "cpu", "cgroup", "rw,cpu"),
                                                  ("/", fs / "memory", "cgroup", "rw,memory")])
    _cgroup_files(fs, {
        "memory/memory.limit_in_bytes": str(9223372036854771712),  # the root: no limit
        "memory/memory.usage_in_bytes": str(50 * MiB),
        "memory/pods/pod1/memory.limit_in_bytes": str(1024 * MiB),  # the pod: 1 GiB, 900 MiB used
        "memory/pods/pod1/memory.usage_in_bytes": str(900 * MiB),
        "memory/pods/pod1/merge/memory.limit_in_bytes": str(512 * MiB),  # the container: 512 MiB, 100 used
        "memory/pods/pod1/merge/memory.usage_in_bytes": str(100 * MiB),
        "cpu/pods/pod1/merge/memory.limit_in_bytes": str(1 * MiB),  # not the memory hierarchy: never read
        "cpu/pods/pod1/merge/memory.usage_in_bytes": "0",
    })
    assert memory_headroom(proc_cgroup=proc, mountinfo=mounts) == 124 * MiB


def test_headroom_finds_a_memory_controller_mounted_with_others_and_a_containers_own_view(tmp_path):
    """cgroup v1 with cpu and memory in one hierarchy (mounted at .../cpu,memory), and a container without a
    cgroup namespace that sees its own cgroup mounted at the hierarchy's top (mount root /pods/pod1/merge): the
    pod above it is not mounted there, so only the container's limit is read."""
    proc = tmp_path / "cgroup"
    proc.write_text("4:cpu,memory:/pods/pod1/merge\n")
    fs = tmp_path / "fs with space"
    _cgroup_files(fs, {"cpu,memory/pods/pod1/memory.limit_in_bytes": str(300 * MiB),
                       "cpu,memory/pods/pod1/memory.usage_in_bytes": str(100 * MiB),
                       "cpu,memory/pods/pod1/merge/memory.limit_in_bytes": str(512 * MiB),
                       "cpu,memory/pods/pod1/merge/memory.usage_in_bytes": str(112 * MiB)})
    comounted = _mountinfo(tmp_path / "comounted", [("/", fs / "cpu,memory", "cgroup", "rw,cpu,memory")])
    assert memory_headroom(proc_cgroup=proc, mountinfo=comounted) == 200 * MiB

    own = fs / "own"
    _cgroup_files(own, {"memory.limit_in_bytes": str(512 * MiB), "memory.usage_in_bytes": str(112 * MiB)})
    container = _mountinfo(tmp_path / "container", [("/pods/pod1/merge", own, "cgroup", "rw,memory")])
    assert memory_headroom(proc_cgroup=proc, mountinfo=container) == 400 * MiB
    elsewhere = _mountinfo(tmp_path / "elsewhere", [("/pods/pod2", own, "cgroup", "rw,memory")])
    assert memory_headroom(proc_cgroup=proc, mountinfo=elsewhere) is None  # another cgroup's view: not ours


def test_headroom_reads_cgroup_v2_and_none_without_a_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    fs = tmp_path / "fs"
    mounts = _mountinfo(tmp_path / "mountinfo", [("/", fs, "cgroup2", "rw,nsdelegate")])
    _cgroup_files(fs, {"kubepods/pod1/memory.max": str(256 * MiB),
                       "kubepods/pod1/memory.current": str(56 * MiB),
                       "kubepods/memory.max": "max", "kubepods/memory.current": str(900 * MiB)})
    assert memory_headroom(proc_cgroup=proc, mountinfo=mounts) == 200 * MiB
    (fs / "kubepods/pod1/memory.max").write_text("max\n")
    assert memory_headroom(proc_cgroup=proc, mountinfo=mounts) is None
    assert memory_headroom(proc_cgroup=tmp_path / "missing", mountinfo=mounts) is None
    assert memory_headroom(proc_cgroup=proc, mountinfo=tmp_path / "missing") is None
    proc.write_text("0::/elsewhere\nnot a cgroup line\n")
    assert memory_headroom(proc_cgroup=proc, mountinfo=mounts) is None


def test_budget_is_a_share_of_the_headroom_and_can_be_set(monkeypatch):
    monkeypatch.delenv(EARLY_READ_BYTES_ENV, raising=False)
    assert budget_bytes(None) == PREFETCH_BYTES
    assert budget_bytes(200 * MiB) == 200 * MiB // LIMIT_SHARE
    assert budget_bytes(100 * PREFETCH_BYTES) == PREFETCH_BYTES
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")
    assert budget_bytes(None) == 0
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, str(64 * MiB))
    assert budget_bytes(None) == 64 * MiB
    assert budget_bytes(100 * MiB) == 25 * MiB  # the memory limit still caps it


def test_asking_reads_the_range_into_the_page_cache(tmp_path):
    file = tmp_path / "input.bin"
    file.write_bytes(np.random.default_rng(1).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
    evict_page_cache([file])
    assert resident_fraction(file) < 0.05
    thread = ask(file, 0, 8 * MiB)
    assert thread is not None
    thread.join()  # the advice is given; the disk reads it asynchronously
    for _ in range(6000):  # until it has (a minute at most: far beyond any disk's 8 MiB)
        if resident_fraction(file) >= 0.5:
            break
        time.sleep(0.01)
    assert 0.5 <= resident_fraction(file) < 0.75  # the range asked for, not the whole file
    assert ask(file, 5, 5) is None
    assert ask(tmp_path / "missing.bin", 0, MiB).join() is None  # advisory: nothing raised


def _model(tmp_path: Path) -> tuple[SafetensorsModel, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    tensors = {f"t{i}": rng.integers(-2**15, 2**15, size, dtype=np.int16)
               for i, size in enumerate([3 * BLOCK // 2 + 11, 5 * BLOCK, 777, 4 * BLOCK + 3, 2 * BLOCK])}
    (tmp_path / "model").mkdir()
    save_file(tensors, str(tmp_path / "model" / "model.safetensors"))
    return SafetensorsModel(tmp_path / "model", "base_model m"), tensors


@pytest.mark.parametrize("early_bytes", [0, 2 * BLOCK + 5, 7 * BLOCK, 1 << 40])
def test_early_bytes_come_from_the_page_cache_and_the_rest_from_the_direct_reader(tmp_path, early_bytes):
    model, tensors = _model(tmp_path)
    file = model.files[0]
    evict_page_cache([file])
    data_start = min(info.offset for info in model.tensors.values())
    data_bytes = sum(array.nbytes for array in tensors.values())
    try:
        assert model.ask_early(early_bytes) == min(early_bytes, data_bytes)
        for thread in model._asking:  # else a read overtaking the advice can see its pages advised back in after
            thread.join()             # they were dropped (the resident check below, 1 run in ~16)
        assert model.read_around_cache(ahead=2, only_uncached=False) == 1
        for name in sorted(tensors, key=lambda n: model.tensors[n].offset):  # the merge's order
            info = model.tensors[name]
            for start in range(0, info.numel, 100_000):  # ranges that cross the end of the early bytes
                got = model.read(name, start, start + 100_000)
                assert np.array_equal(got, tensors[name][start:start + 100_000]), (name, start)
        reader = model._direct[file]
        early_end = data_start + min(early_bytes, data_bytes)
        # the direct reader began at the block holding the end of the early bytes: none of theirs read twice
        first_block = early_end // BLOCK * BLOCK
        assert reader.bytes_read <= file.stat().st_size - first_block
        if early_end < file.stat().st_size - 2 * BLOCK:
            assert reader.bytes_read > 0
        assert resident_fraction(file) < 0.05  # the early bytes were dropped from the page cache once read
    finally:
        model.close()


def _merge(family, out: Path, **params) -> dict:
    base, fts = family
    request = MergeRequest(base_model=str(base), models_to_merge=[str(f) for f in fts], merge_method="mask_merging",
                           output_dir=str(out), weight_mask_rates=[0.5, 0.3], mask_strategy="random",
                           mask_apply_method="task_arithmetic", scaling_coefficient=0.7, **params)
    assert run_merge(request, progress="none") == 0
    return json.loads((out / "merge_report.json").read_text())["statistics"]


def test_a_merge_with_early_reads_gives_the_same_bytes(tmp_path, monkeypatch):
    family = make_family(tmp_path / "models", n=2)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "1000")
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")
    without = _merge(family, tmp_path / "without")
    assert without["early_read_bytes"] == 0 and without["direct_read_files"] == 3
    size = (family[0] / "model.safetensors").stat().st_size
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, str(3 * size // 2))  # half of each file's data, shared by 3
    for directory in (family[0], *family[1]):
        evict_page_cache([directory])
    early = _merge(family, tmp_path / "early")
    assert 0 < early["early_read_bytes"] <= 3 * size // 2 and early["direct_read_files"] == 3
    weights = [{f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
               for out in (tmp_path / "without", tmp_path / "early")]
    assert weights[0] == weights[1]


def test_a_bad_early_reads_setting_is_named(tmp_path, monkeypatch):
    base, fts = make_family(tmp_path / "models", n=1)
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "lots")
    request = MergeRequest(base_model=str(base), models_to_merge=[str(fts[0])], merge_method="task_arithmetic",
                           output_dir=str(tmp_path / "out"))
    assert run_merge(request, progress="none", summary_file=str(tmp_path / "summary.json")) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert EARLY_READ_BYTES_ENV in summary["error"] and "'lots'" in summary["error"]
    assert not (tmp_path / "out").exists()


def test_asking_again_for_more_extends_the_region_without_asking_twice(tmp_path, monkeypatch):
    model, tensors = _model(tmp_path)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr("modelmerge_engine.safetensors_io.ask", lambda file, start, stop: asked.append((start, stop)))
    data_start = min(info.offset for info in model.tensors.values())
    data_bytes = sum(array.nbytes for array in tensors.values())
    try:
        assert model.ask_early(2 * BLOCK) == 2 * BLOCK
        assert model.ask_early(BLOCK) == 2 * BLOCK  # less than asked before: nothing new
        assert model.ask_early(5 * BLOCK) == 5 * BLOCK
        assert model.ask_early(1 << 40) == data_bytes
        assert asked == [(data_start, data_start + 2 * BLOCK), (data_start + 2 * BLOCK, data_start + 5 * BLOCK),
                         (data_start + 5 * BLOCK, data_start + data_bytes)]
    finally:
        model.close()


@pytest.mark.parametrize(("method", "share"), [("task_arithmetic", 1), ("ties_merging", 2)])
def test_a_merge_reading_its_inputs_once_asks_for_the_whole_budget_the_others_for_half(tmp_path, monkeypatch,
                                                                                        method, share):
    """Half as the headers are read; the other half only where the inputs are read once, around the page cache
    (task arithmetic), not where statistics passes read them mapped (TIES)."""
    base, fts = make_family(tmp_path / "models", n=2)
    models = [SafetensorsModel(d, "m") for d in (base, *fts)]
    data = sum(t.numel * t.dtype.size for m in models for t in m.tensors.values())
    for model in models:
        model.close()
    budget = data // 2
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, str(budget))
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    request = MergeRequest(base_model=str(base), models_to_merge=[str(f) for f in fts], merge_method=method,
                           output_dir=str(tmp_path / "out"), scaling_coefficient=0.5)
    assert run_merge(request, progress="none") == 0
    statistics = json.loads((tmp_path / "out" / "merge_report.json").read_text())["statistics"]
    assert statistics["direct_read_files"] == (3 if share == 1 else 0)
    assert budget // share - 3 <= statistics["early_read_bytes"] <= budget // share


def test_models_opening_the_same_files_are_asked_once_as_the_last_of_them(tmp_path):
    """A mergekit config's base that is also its first input: the budget is shared by the distinct files, and the
    fine-tune (the model that reads them around the page cache) holds the early region."""
    base, fts = make_family(tmp_path / "models", n=2)
    models = [SafetensorsModel(fts[0], "base_model"), SafetensorsModel(fts[0], "models_to_merge[0]"),
              SafetensorsModel(fts[1], "models_to_merge[1]")]
    try:
        ask_shared(models, 2 * 4096)  # less than either model's tensor data
        assert [model.early_bytes for model in models] == [0, 4096, 4096]
    finally:
        for model in models:
            model.close()
