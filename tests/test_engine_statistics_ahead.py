"""Per-tensor statistics computed ahead (Method.statistics_ahead): the next tensors' states on threads of their own
while the current tensor merges, for multislerp, model_stock and nuslerp; the same bytes as computing them in turn,
in order, and an error in one of them is the merge's error."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from modelmerge.contract import MergeRequest
from modelmerge_engine import engine
from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods import method_class
from modelmerge_engine.run import run_merge
from tests.helpers.models import make_family, read_state_dict

AHEAD = ("multislerp", "model_stock", "nuslerp")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n=2, arch="llama", dtype=torch.bfloat16, vocab=256,
                       hidden=64, intermediate=160, layers=3)


def _config(method: str, family) -> dict:
    base, fts = family
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(ft), "parameters": {"weight": 0.5 + i}} for i, ft in enumerate(fts)]}


def _merge(config: dict, out, monkeypatch, *, cpus: int) -> tuple[int, list[str], dict]:
    """The merge with `cpus` workers; returns its exit code, the threads tensor_state ran on, and its summary."""
    monkeypatch.setattr(engine, "available_cpus", lambda: cpus)
    threads: list[str] = []
    cls = method_class(config["merge_method"])
    original = cls.tensor_state

    def recorded(self, plan):
        threads.append(threading.current_thread().name)
        return original(self, plan)

    monkeypatch.setattr(cls, "tensor_state", recorded)
    summary = out.parent / f"{out.name}.summary.json"
    code = run_merge(MergeRequest(config=config, output_dir=str(out)), progress="none", summary_file=str(summary))
    return code, threads, json.loads(summary.read_text())


@pytest.mark.parametrize("method", AHEAD)
def test_states_computed_ahead_on_their_threads_give_the_bytes_of_computing_them_in_turn(family, tmp_path,
                                                                                          monkeypatch, method):
    config = _config(method, family)
    code, threads, _ = _merge(config, tmp_path / "ahead", monkeypatch, cpus=3)
    assert code == 0 and threads and all(name.startswith("statistics") for name in threads), threads
    assert len(set(threads)) > 1  # several tensors' statistics at once
    code, threads, _ = _merge(config, tmp_path / "in_turn", monkeypatch, cpus=1)
    assert code == 0 and set(threads) == {"MainThread"}
    ahead, in_turn = read_state_dict(tmp_path / "ahead"), read_state_dict(tmp_path / "in_turn")
    assert ahead.keys() == in_turn.keys()
    for name, tensor in in_turn.items():
        assert torch.equal(ahead[name].view(torch.int16), tensor.view(torch.int16)), name


def test_methods_with_large_per_tensor_state_compute_it_in_turn(family, tmp_path, monkeypatch):
    """ties keeps a selection per tensor (scratch arrays): one tensor's at a time, on the merge's own thread."""
    base, fts = family
    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(ft), "parameters": {"weight": 1.0, "density": 0.5}} for ft in fts]}
    code, threads, _ = _merge(config, tmp_path / "ties", monkeypatch, cpus=3)
    assert code == 0 and threads and set(threads) == {"MainThread"}


def test_an_error_computing_a_later_tensors_state_is_the_merges_error(family, tmp_path, monkeypatch):
    cls = method_class("multislerp")
    original = cls.tensor_state

    def failing(self, plan):
        if plan.name.startswith("model.layers.2."):
            raise MergeError(f"multislerp: tensor {plan.name}: a planted failure")
        return original(self, plan)

    monkeypatch.setattr(cls, "tensor_state", failing)
    out = tmp_path / "out"
    code, threads, summary = _merge(_config("multislerp", family), out, monkeypatch, cpus=3)
    assert code == 1 and summary["status"] == "failed"
    assert "a planted failure" in summary["error"] and "model.layers.2." in summary["error"]
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("statistics")]


def test_while_one_tensors_state_takes_long_the_other_threads_compute_the_next_tensors_states(family, tmp_path,
                                                                                                monkeypatch):
    """The window of states computed ahead is wider than the threads: while the first tensor's statistics run
    (the embedding, a quarter of a model), the other statistics thread goes on through the next tensors, rather
    than stopping after one more. The first state is held until that many later states are done (bounded wait:
    a regression fails on the count, it does not hang)."""
    later = engine.STATISTICS_WINDOW - 2  # the window holds the held tensor, these, and one being computed
    cls = method_class("model_stock")
    original = cls.tensor_state
    done_later: list[str] = []
    enough = threading.Event()
    seen_when_released: list[int] = []
    first: list[str] = []
    choosing = threading.Lock()  # two statistics threads enter at once: only one may be the held one

    def held(self, plan):
        with choosing:
            is_first = not first
            if is_first:
                first.append(plan.name)
        if is_first:
            enough.wait(timeout=60)
            seen_when_released.append(len(done_later))
        else:
            done_later.append(plan.name)
            if len(done_later) >= later:
                enough.set()
        return original(self, plan)

    monkeypatch.setattr(cls, "tensor_state", held)
    code, _, summary = _merge(_config("model_stock", family), tmp_path / "out", monkeypatch, cpus=2)
    assert code == 0, summary
    assert seen_when_released[0] >= later, (seen_when_released, done_later)
