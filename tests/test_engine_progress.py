"""The engine's progress lines, as the operator and the local backend read them (`parse_progress`): real merges
of tiny models run by the CLI with `--progress lines`, for every method of the contract's registry."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from modelmerge.contract import METHODS, MergeProgress, MergeRequest, parse_progress
from tests.helpers.models import make_family, make_finetune, make_model

SIZE = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 2}
RANGE_ELEMENTS = "1000"  # small ranges: many progress updates per step
MASK_RATES = "0.3,0.6"
GLOBAL_TIES = "ties_merging_dare"  # one global threshold per model: thresholds, signs, merge

# Every method of the registry, plus the mask_merging variants whose threshold work differs: magnitude masks
# found per tensor inside the merge step, or in the thresholds step of a global-TIES apply method.
CASES = {method: {} for method in METHODS} | {
    "mask_merging-magnitude-ties_merging": {"mask_strategy": "magnitude", "mask_apply_method": "ties_merging"},
    "mask_merging-magnitude-ties_merging_dare": {"mask_strategy": "magnitude", "mask_apply_method": GLOBAL_TIES},
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # float32 thresholds take two passes
MOE_SIZE = {"vocab": 128, "hidden": 32, "intermediate": 48, "layers": 2, "experts": 4}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    return {name: make_family(root / name, n=2, dtype=dtype, **SIZE) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """Experts stored one tensor per expert: per-tensor statistics are taken once per fused parameter."""
    root = tmp_path_factory.mktemp("progress-mixtral")
    base = make_model(root / "base", arch="mixtral", **MOE_SIZE)
    return base, [make_finetune(base, root / f"ft{i}", seed=300 + i) for i in range(2)]


def merge_with_progress(base, finetunes, out, case: str, dtype: str) -> subprocess.CompletedProcess:
    method = case.split("-")[0]
    spec = METHODS[method]  # the parameters it requires (their examples) and the models it takes
    required = {name: MergeRequest.model_fields[name].examples[0] for name in spec.required}
    fields = {"merge_method": method, "dtype": dtype, **required, **CASES[case]}
    finetunes = finetunes[:spec.models[1] or len(finetunes)]
    if method == "mask_merging":
        fields["weight_mask_rates"] = MASK_RATES
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in fields.items()]
    return subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines",
                           "--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)),
                           "--output-dir", str(out), *flags], capture_output=True, text=True,
                          env={**os.environ, "MODELMERGE_ENGINE_RANGE_ELEMENTS": RANGE_ELEMENTS})


def expected_steps(case: str) -> list[str]:
    combine = CASES[case].get("mask_apply_method", case.split("-")[0])
    return ["thresholds", "signs", "merge"] if combine == GLOBAL_TIES else ["merge"]


def progress_lines(stderr: str) -> list[tuple[MergeProgress, str]]:
    """Every progress line, parsed; a line that looks like progress but does not parse fails the test."""
    parsed = []
    for line in stderr.splitlines():
        if line.startswith("["):
            progress = parse_progress(line)
            assert progress is not None, f"not a progress line in the contract's format: {line!r}"
            parsed.append((progress, line))
    return parsed


def assert_progress_of_one_merge(parsed: list[tuple[MergeProgress, str]], steps: list[str]) -> None:
    assert parsed, "no progress lines"
    assert {p.steps for p, _ in parsed} == {len(steps)}
    indexes = [p.stepIndex for p, _ in parsed]
    assert indexes == sorted(indexes), indexes
    assert sorted(set(indexes)) == list(range(1, len(steps) + 1)), indexes
    for progress, _ in parsed:
        assert progress.step == steps[progress.stepIndex - 1], progress
    percents = [p.percent for p, _ in parsed]
    assert all(a <= b for a, b in zip(percents, percents[1:], strict=False)), percents
    assert percents[-1] == 100.0 and parsed[-1][0].stepPercent == 100.0
    for index in range(1, len(steps) + 1):
        lines = [(p, line) for p, line in parsed if p.stepIndex == index]
        assert lines[0][0].stepPercent == 0.0, lines[0][1]
        assert lines[-1][0].stepPercent == 100.0, lines[-1][1]
        step_percents = [p.stepPercent for p, _ in lines]
        assert step_percents == sorted(step_percents), step_percents
        # the work planned up front is the work done: the step's last line counts exactly what was planned
        done, planned = map(int, re.search(r" (\d+)/(\d+) values", lines[-1][1]).groups())
        assert done == planned > 0, lines[-1][1]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_progress_lines_cover_the_whole_merge(families, tmp_path, case, dtype):
    base, finetunes = families[dtype]
    result = merge_with_progress(base, finetunes, tmp_path / "out", case, dtype)
    assert result.returncode == 0, result.stderr
    parsed = progress_lines(result.stderr)
    steps = expected_steps(case)
    assert_progress_of_one_merge(parsed, steps)
    assert len(parsed) > 3 * len(steps), "small ranges give updates within every step"
    if case == GLOBAL_TIES:
        assert [p.stepIndex for p, _ in parsed].count(2) > 2 and parsed[0][0].steps == 3
    assert parse_progress(result.stderr) == parsed[-1][0]  # a log tail reads as its last line


@pytest.mark.parametrize("case", ["ties_merging", "mask_merging-magnitude-ties_merging",
                                  "mask_merging-magnitude-ties_merging_dare"])
def test_progress_counts_statistics_of_fused_expert_parameters_once(mixtral, tmp_path, case):
    base, finetunes = mixtral
    result = merge_with_progress(base, finetunes, tmp_path / "out", case, "bfloat16")
    assert result.returncode == 0, result.stderr
    assert_progress_of_one_merge(progress_lines(result.stderr), expected_steps(case))


def test_bar_mode_shows_the_same_progress(families, tmp_path, monkeypatch):
    """On a terminal the bar is redrawn in place; each redraw is the bar and the same contract line."""
    from modelmerge_engine.progress import BAR_WIDTH
    from modelmerge_engine.run import run_merge

    base, finetunes = families["bfloat16"]
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           merge_method=GLOBAL_TIES, output_dir=str(tmp_path / "out"))
    monkeypatch.setenv("MODELMERGE_ENGINE_RANGE_ELEMENTS", RANGE_ELEMENTS)
    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert run_merge(request, progress="bar") == 0
    redraws = [s.removesuffix("\033[K").split(" ", 1) for s in re.split(r"[\r\n]", stderr.getvalue())
               if s.startswith(("#", "."))]
    parsed = [(parse_progress(line), line) for _, line in redraws]
    assert all(p is not None for p, _ in parsed), [line for p, line in parsed if p is None]
    assert_progress_of_one_merge(parsed, ["thresholds", "signs", "merge"])
    for (bar, _), (progress, _) in zip(redraws, parsed, strict=True):
        filled = len(bar.rstrip("."))
        assert bar == "#" * filled + "." * (BAR_WIDTH - filled)
        shown = progress.percent  # rounded to 0.1 in the line
        assert int(BAR_WIDTH * (shown - 0.05) / 100) <= filled <= int(BAR_WIDTH * (shown + 0.05) / 100), bar
