"""Inputs read around the page cache (direct_read.py): the bytes of any read order, from several threads; the
memory it holds; the fallbacks; and merges that read their inputs that way give the same output bytes."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelmerge.contract import MergeRequest
from modelmerge_engine import direct_read
from modelmerge_engine.direct_read import DirectReader, DirectReadRefused, resident_fraction
from modelmerge_engine.early_reads import EARLY_READ_BYTES_ENV
from modelmerge_engine.engine import INPUT_READS_ENV, RANGE_ELEMENTS_ENV
from modelmerge_engine.run import run_merge
from modelmerge_engine.safetensors_io import SafetensorsModel
from tests.helpers.memory_cgroup import evict_page_cache
from tests.helpers.models import make_family
from tests.helpers.refused_o_direct import refuse_o_direct_at_open

BLOCK = 8192  # small blocks, so every test crosses many of them


@pytest.fixture
def data_file(tmp_path) -> tuple[Path, bytes]:
    data = np.random.default_rng(3).integers(0, 256, 40 * BLOCK + 1234, dtype=np.uint8).tobytes()
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    return path, data


def test_forward_reads_of_every_size_are_the_files_bytes(data_file):
    path, data = data_file
    reader = DirectReader(path, ahead=2, block=BLOCK)
    try:
        offset, rng = 0, random.Random(1)
        while offset < len(data):
            size = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 777])
            got = reader.read(offset, size)
            assert got.tobytes() == data[offset:offset + size]
            offset += size
        assert reader.read(len(data) - 10, 100).tobytes() == data[-10:]  # past the end: what there is
        assert reader.read(len(data), 10).size == 0
    finally:
        reader.close()


def test_jumps_back_and_far_ahead_read_the_right_bytes(data_file):
    path, data = data_file
    reader = DirectReader(path, ahead=2, block=BLOCK)
    try:
        for offset, size in [(0, 100), (20 * BLOCK + 3, 2 * BLOCK), (5, BLOCK * 3), (39 * BLOCK, 5000),
                             (BLOCK, 10), (38 * BLOCK - 7, 2 * BLOCK + 1234 + 7)]:
            assert reader.read(offset, size).tobytes() == data[offset:offset + size], (offset, size)
    finally:
        reader.close()


@pytest.mark.parametrize(("workers", "pause_s"), [(4, 0.0), (8, 0.002)])
def test_threads_reading_ranges_in_turn_as_the_merge_does(data_file, workers, pause_s):
    """Workers take ranges in order and finish them out of order, as the engine's pool does (with pauses, some
    fall behind others by several blocks)."""
    path, data = data_file
    jitter = random.Random(5)
    reader = DirectReader(path, ahead=2, block=BLOCK)
    ranges = [(start, min(start + 3000, len(data))) for start in range(0, len(data), 3000)]
    results: dict[int, bytes] = {}
    taken = iter(ranges)
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                job = next(taken, None)
            if job is None:
                return
            if pause_s:
                time.sleep(jitter.random() * pause_s)
            results[job[0]] = reader.read(job[0], job[1] - job[0]).tobytes()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        reader.close()
    assert b"".join(results[start] for start, _ in ranges) == data


def test_a_read_of_blocks_in_flight_waits_for_them_and_no_block_is_read_twice(data_file, monkeypatch):
    """The first read arrives while the read-ahead's first blocks are still being read (a slow disk, as a loaded
    CI host has): it waits for them, not moving the read-ahead back to them (which read them again, up to a third
    of the file more in CI)."""
    path, data = data_file
    gate, pending = threading.Event(), []
    real_preadv = direct_read.os.preadv

    def slow_disk(fd, buffers, offset):
        pending.append(offset)
        gate.wait()
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(direct_read.os, "preadv", slow_disk)
    start = 2 * BLOCK + 5
    reader = DirectReader(path, ahead=2, block=BLOCK, start=start)
    got: list[bytes] = []
    reading = threading.Thread(target=lambda: got.extend(reader.read(offset, 1000).tobytes()
                                                         for offset in range(start, len(data), 1000)))
    try:
        while len(pending) < 2:  # the blocks up to the read-ahead's end are in flight
            time.sleep(0.001)
        reading.start()
        while not reader._reads:  # the first read has asked for its blocks
            time.sleep(0.001)
        gate.set()
        reading.join()
    finally:
        gate.set()
        reader.close()
    assert b"".join(got) == data[start:]
    assert reader.bytes_read == len(data) - 2 * BLOCK  # every block from the start's, once
    assert len(pending) == len(set(pending))


def test_memory_is_a_few_blocks_and_none_after_the_end(data_file):
    path, data = data_file
    reader = DirectReader(path, ahead=3, block=BLOCK)
    try:
        assert reader.buffers() == 0  # nothing is read before the first read
        most = 0
        for offset in range(0, len(data), 1000):
            reader.read(offset, 1000)
            most = max(most, reader.buffers())
        assert 0 < most <= 3 + 3 + 2  # ahead, one per reading thread, the blocks of the current read
        assert reader.buffers() == 0  # read to the end: every block freed
    finally:
        reader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("read-ahead")]


def test_a_filesystem_refusing_o_direct_is_mapped_instead(tmp_path, monkeypatch):
    base, _ = make_family(tmp_path, n=1)
    refuse_o_direct_at_open(monkeypatch)
    with pytest.raises(DirectReadRefused):
        DirectReader(base / "model.safetensors")
    model = SafetensorsModel(base, "base")
    try:
        assert model.read_around_cache(ahead=3, only_uncached=False) == 0
        name = next(iter(model.tensors))
        assert model.read(name, 0, 5).size == 5
    finally:
        model.close()


def test_resident_fraction_sees_the_page_cache(tmp_path):
    base, _ = make_family(tmp_path, n=1)
    file = base / "model.safetensors"
    file.read_bytes()
    assert resident_fraction(file) == 1.0
    evict_page_cache([base])
    assert resident_fraction(file) < 0.5


def _merge(family, out: Path, method: str, **params) -> dict:
    base, fts = family
    request = MergeRequest(base_model=str(base), models_to_merge=[str(f) for f in fts], merge_method=method,
                           output_dir=str(out), **params)
    assert run_merge(request, progress="none") == 0
    return json.loads((out / "merge_report.json").read_text())["statistics"]


def _sharded(directory: Path, *, tensors_per_shard: int = 5) -> None:
    """Rewrite a model's weights as shards of a few tensors each, with an index (as transformers shards)."""
    from safetensors.torch import load_file, save_file

    single = directory / "model.safetensors"
    tensors = load_file(single)
    names = list(tensors)
    groups = [names[i:i + tensors_per_shard] for i in range(0, len(names), tensors_per_shard)]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
    single.unlink()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _weights(out: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(out.glob("*.safetensors"))}


SINGLE_PASS = [("task_arithmetic", {"scaling_coefficient": 0.3}), ("average_merging", {}),
               ("mask_merging", {"weight_mask_rates": [0.5, 0.3], "mask_strategy": "random",
                                 "mask_apply_method": "task_arithmetic", "scaling_coefficient": 0.7})]


@pytest.mark.parametrize(("method", "params"), SINGLE_PASS, ids=[m for m, _ in SINGLE_PASS])
def test_direct_reads_give_the_mapped_merges_bytes(tmp_path, monkeypatch, method, params):
    """Sharded inputs, ranges split small, so the reads cross blocks and shards."""
    family = make_family(tmp_path / "models", n=2)
    for directory in (family[0], *family[1]):
        _sharded(directory)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "1000")
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")  # every read of a direct-read file goes direct
    monkeypatch.setenv(INPUT_READS_ENV, "mapped")
    mapped_stats = _merge(family, tmp_path / "mapped", method, **params)
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    direct_stats = _merge(family, tmp_path / "direct", method, **params)
    assert mapped_stats["direct_read_files"] == 0
    files = sum(len(list(d.glob("*.safetensors"))) for d in [family[0], *family[1]])
    assert files > 3 and direct_stats["direct_read_files"] == files
    assert _weights(tmp_path / "direct") == _weights(tmp_path / "mapped")


def test_auto_reads_direct_only_what_the_page_cache_lacks(tmp_path, monkeypatch):
    base, fts = family = make_family(tmp_path / "models", n=2)
    monkeypatch.delenv(INPUT_READS_ENV, raising=False)
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")  # early reads would fill the page cache with these tiny files
    for directory in (base, *fts):
        (directory / "model.safetensors").read_bytes()
    assert _merge(family, tmp_path / "warm", "task_arithmetic")["direct_read_files"] == 0
    evict_page_cache([fts[1]])
    assert _merge(family, tmp_path / "one-cold", "task_arithmetic")["direct_read_files"] == 1
    for directory in (base, *fts):
        evict_page_cache([directory])
    assert _merge(family, tmp_path / "cold", "task_arithmetic")["direct_read_files"] == 3
    assert _weights(tmp_path / "cold") == _weights(tmp_path / "warm")


@pytest.mark.parametrize(("method", "params"), [
    ("ties_merging", {"param_value_mask_rate": 0.5}), ("ties_merging_dare", {"param_value_mask_rate": 0.5}),
    ("mask_merging", {"weight_mask_rates": [0.5, 0.5], "mask_strategy": "magnitude"})],
    ids=["ties_merging", "ties_merging_dare", "magnitude-masks"])
def test_methods_reading_inputs_more_than_once_keep_them_mapped(tmp_path, monkeypatch, method, params):
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    assert _merge(make_family(tmp_path / "models", n=2), tmp_path / "out", method, **params)["direct_read_files"] == 0


def test_a_bad_input_reads_setting_is_named(tmp_path, monkeypatch):
    base, fts = make_family(tmp_path / "models", n=1)
    monkeypatch.setenv(INPUT_READS_ENV, "sometimes")
    request = MergeRequest(base_model=str(base), models_to_merge=[str(fts[0])], merge_method="task_arithmetic",
                           output_dir=str(tmp_path / "out"))
    assert run_merge(request, progress="none", summary_file=str(tmp_path / "summary.json")) != 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert INPUT_READS_ENV in summary["error"] and "'sometimes'" in summary["error"]
    assert not (tmp_path / "out").exists()


def _merge_config(config: dict, out: Path) -> dict:
    request = MergeRequest.model_validate({"config": config, "output_dir": str(out)})
    assert run_merge(request, progress="none") == 0
    return json.loads((out / "merge_report.json").read_text())["statistics"]


def _models(paths, **parameters) -> list[dict]:
    return [{"model": str(path), "parameters": dict(parameters)} for path in paths]


# mergekit configs whose merge step is their only read, and the models whose files are read around the page cache
# (the base's index; fine-tunes' 1, 2): linear's base (no base_model: the first model) is one of its inputs, read
# once as that input; dare_linear draws random masks and, without rescale, takes no statistics pass.
SINGLE_PASS_CONFIGS = {
    "task_arithmetic": (lambda base, fts: {"merge_method": "task_arithmetic", "base_model": str(base),
                                           "models": _models(fts, weight=0.4)}, (0, 1, 2)),
    "dare_linear": (lambda base, fts: {"merge_method": "dare_linear", "base_model": str(base),
                                       "models": _models(fts, weight=0.5, density=0.6),
                                       "parameters": {"rescale": False}}, (0, 1, 2)),
    "linear-without-base_model": (lambda base, fts: {"merge_method": "linear", "models": _models(fts, weight=0.7),
                                                     "parameters": {"normalize": False}}, (1, 2)),
}


@pytest.mark.parametrize("name", list(SINGLE_PASS_CONFIGS))
def test_configs_reading_inputs_once_read_them_around_the_cache_with_the_mapped_bytes(tmp_path, monkeypatch, name):
    """Sharded inputs, ranges split small; a file two models read (linear's base, its first input) is read by the
    one that reads its values."""
    family = make_family(tmp_path / "models", n=2)
    for directory in (family[0], *family[1]):
        _sharded(directory)
    make_config, reading = SINGLE_PASS_CONFIGS[name]
    config = make_config(*family)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "1000")
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")
    monkeypatch.setenv(INPUT_READS_ENV, "mapped")
    mapped_stats = _merge_config(config, tmp_path / "mapped")
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    direct_stats = _merge_config(config, tmp_path / "direct")
    assert mapped_stats["direct_read_files"] == 0
    shards = len(list(family[0].glob("*.safetensors")))
    assert shards > 1 and direct_stats["direct_read_files"] == shards * len(reading)
    assert _weights(tmp_path / "direct") == _weights(tmp_path / "mapped")


def test_configs_laid_out_otherwise_or_reading_twice_keep_their_inputs_mapped(tmp_path, monkeypatch):
    """Slices (the output's layers come from other layers), a moved vocabulary (tokenizer_source over vocabularies
    that differ: rows gathered), a statistics pass (dare_linear's rescale) and magnitude selection (ties)."""
    from tests.test_mergekit_tokenizer_union import ADDED, add_tokens

    base, fts = make_family(tmp_path / "models", n=2)
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    linear = {"merge_method": "linear", "models": _models(fts, weight=0.5)}
    sliced = {"merge_method": "linear", "slices": [{"sources": [{"model": str(ft), "layer_range": [0, layers],
                                                                  "parameters": {"weight": 0.5}} for ft in fts]}]}
    assert _merge_config(linear, tmp_path / "linear")["direct_read_files"] == 2  # the same models read once
    assert _merge_config(sliced, tmp_path / "sliced")["direct_read_files"] == 0
    rescaled = {"merge_method": "dare_linear", "base_model": str(base), "models": _models(fts, weight=0.5, density=0.6)}
    assert _merge_config(rescaled, tmp_path / "rescaled")["direct_read_files"] == 0
    ties = {"merge_method": "ties", "base_model": str(base), "models": _models(fts, weight=0.5, density=0.6)}
    assert _merge_config(ties, tmp_path / "ties")["direct_read_files"] == 0
    task_arithmetic = {"merge_method": "task_arithmetic", "base_model": str(base), "models": _models(fts, weight=0.5)}
    assert _merge_config(task_arithmetic, tmp_path / "same-vocabulary")["direct_read_files"] == 3
    add_tokens(fts[1], ADDED[0], rename=None, seed=7)
    union = {**task_arithmetic, "tokenizer_source": "union"}
    assert _merge_config(union, tmp_path / "union")["direct_read_files"] == 0


def test_a_base_also_merged_as_a_fine_tune_stays_mapped_for_both(tmp_path, monkeypatch):
    """Both read its values: one O_DIRECT reader would serve the same range twice, two would read it twice."""
    base, fts = make_family(tmp_path / "models", n=1)
    monkeypatch.setenv(EARLY_READ_BYTES_ENV, "0")
    monkeypatch.setenv(INPUT_READS_ENV, "mapped")
    mapped_stats = _merge((base, [base, fts[0]]), tmp_path / "mapped", "task_arithmetic", scaling_coefficient=0.4)
    monkeypatch.setenv(INPUT_READS_ENV, "direct")
    direct_stats = _merge((base, [base, fts[0]]), tmp_path / "direct", "task_arithmetic", scaling_coefficient=0.4)
    assert (mapped_stats["direct_read_files"], direct_stats["direct_read_files"]) == (0, 1)
    assert _weights(tmp_path / "direct") == _weights(tmp_path / "mapped")
