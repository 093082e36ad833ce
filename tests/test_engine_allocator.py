"""allocator.keep_freed_memory: a merge's range buffers, allocated and freed by each thread range after range, reuse
the pages freed before them instead of being mapped, faulted in and zeroed by the kernel again. Measured as the
minor page faults of such a loop in a fresh process (ru_minflt): with glibc's defaults most pages of every range
fault, with the merge's settings none do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.models import make_family

ROOT = Path(__file__).resolve().parents[1]

# Four 1 MiB buffers per range (inputs, masked copies, the output) on a worker thread, as a merge's ranges do;
# prints the minor page faults of 50 ranges after 3 to settle.
RANGES = """
import resource, threading
import numpy as np

def ranges(count):
    for _ in range(count):
        buffers = [np.ones(1 << 20, np.uint8) for _ in range(4)]
        del buffers

def faults(result):
    ranges(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ranges(50)
    result.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

result = []
worker = threading.Thread(target=faults, args=(result,))
worker.start()
worker.join()
print(result[0])
"""
PAGES_PER_RANGE = 4 * (1 << 20) // 4096


def _faults(setup: str) -> int:
    env = {"PYTHONPATH": f"{ROOT / 'merge_image'}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", setup + RANGES], capture_output=True, text=True, env=env,
                          check=True)
    return int(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n=2, dtype=torch.bfloat16)


def test_glibcs_defaults_fault_in_every_range_the_merges_settings_reuse_the_pages():
    default = _faults("")
    kept = _faults("from modelmerge_engine.allocator import keep_freed_memory\nassert keep_freed_memory()\n")
    assert default > 50 * PAGES_PER_RANGE // 2  # what the setting is for: the loop faults without it
    assert kept < PAGES_PER_RANGE // 4  # 50 ranges fault in less than a quarter of one range's pages


def test_a_merge_sets_them_for_its_process(family, tmp_path):
    """run_merge sets the thresholds: after a merge, in the same process, the loop faults no more than with
    keep_freed_memory called directly."""
    base, fts = family
    request = {"base_model": str(base), "models_to_merge": [str(ft) for ft in fts], "merge_method": "task_arithmetic",
               "output_dir": str(tmp_path / "out")}
    merged = ("import json\nfrom modelmerge.contract import MergeRequest\nfrom modelmerge_engine.run import run_merge\n"
              f"assert run_merge(MergeRequest.model_validate(json.loads({json.dumps(json.dumps(request))})), "
              "progress='none') == 0\n")
    assert _faults(merged) < PAGES_PER_RANGE // 4
    assert (tmp_path / "out" / "model.safetensors").exists()
