"""bench/bench_engine.py's choices that decide what a recording measures (the recordings themselves are run by
hand: minutes per method)."""

from __future__ import annotations

import argparse

import pytest

from bench.bench_engine import MERGEKIT_METHODS, METHODS, engine_methods
from modelmerge_engine.precompile import METHODS as PRECOMPILED


def _args(suite: str, methods: list[str], *, limits: list[int] = (), limit_methods: list[str] = ()):
    return argparse.Namespace(suite=suite, methods=methods, limits=list(limits), limit_methods=list(limit_methods))


def test_every_mergekit_method_of_the_bench_is_one_the_precompile_compiles():
    assert set(engine_methods(_args("mergekit", list(MERGEKIT_METHODS)))) <= set(PRECOMPILED)


@pytest.mark.parametrize(("limits", "expected"), [([], ["linear", "mergekit_task_arithmetic"]),
                                                  ([256 << 20], ["linear", "mergekit_task_arithmetic", "ties"])])
def test_a_part_of_the_mergekit_suite_compiles_its_own_methods_and_its_limit_runs(limits, expected):
    """Not every method (minutes each): those the part merges with, and the limit runs' only where it has some."""
    args = _args("mergekit", ["task_arithmetic", "linear"], limits=limits, limit_methods=["ties"])
    assert engine_methods(args) == expected


def test_the_merging_eval_suite_compiles_its_five_methods():
    assert engine_methods(_args("merging-eval", ["task_arithmetic"])) == list(METHODS)
