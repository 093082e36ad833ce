"""The metric against its oracle: transformers' own `model(input_ids, attention_mask, labels).loss` weighted by
the answer tokens (tests/helpers/eval_oracle.py), one record at a time and in merging-eval's own loop (every
record padded to max_length, batches of 10), on tiny real models with a real chat tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.data import load_data_files
from modelmerge_engine.evaluation.encode import SYSTEM_PROMPT
from modelmerge_engine.evaluation.options import EvalOptions
from modelmerge_engine.evaluation.scoring import evaluate
from tests.helpers.eval_data import make_chat_model, make_records, write_records
from tests.helpers.eval_oracle import batches_loss, padded_batches, per_record

MAX_POSITIONS = 128  # tiny_config's max_position_embeddings
FLOAT32_RTOL = 2e-6


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def chat_model(request, tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp(f"eval-{request.param}") / "model", arch=request.param,
                           hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two files: instruction/output as a JSON array, problem/solution as JSON Lines; 23 and 14 records."""
    root = tmp_path_factory.mktemp("eval-data")
    code = make_records(23, seed=3)
    algebra = make_records(14, seed=4, layout=("problem", "solution"))
    write_records(root / "code.json", code)
    write_records(root / "algebra.jsonl", algebra, jsonl=True)
    return root, {"algebra": algebra, "code": code}


def oracle(model_dir, records, *, max_length, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, per_record(model, tokenizer, records, max_length=max_length)


def test_tokenizer_is_a_real_chat_tokenizer(chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": "solve x"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("batch_size", [1, 4, 10, 64])
def test_cross_entropy_equals_transformers_loss(chat_model, data, batch_size):
    root, records = data
    report = evaluate(str(chat_model), load_data_files([root]), EvalOptions(batch_size=batch_size))
    assert report["max_length"] == MAX_POSITIONS  # the default 2048 capped at the model's positions
    assert (report["dtype"], report["device"], report["full_forward"]) == ("float32", "cpu", False)
    total_sum = total_tokens = 0
    for result in report["files"]:
        _, _, expected = oracle(chat_model, records[result["name"]], max_length=MAX_POSITIONS)
        loss_sum, tokens = math.fsum(s for s, _ in expected), sum(t for _, t in expected)
        assert result["tokens"] == tokens > 0
        assert result["records"] == len(records[result["name"]])
        assert result["ce"] == pytest.approx(loss_sum / tokens, rel=FLOAT32_RTOL, abs=0)
        assert result["ppl"] == pytest.approx(math.exp(loss_sum / tokens), rel=FLOAT32_RTOL * 10)
        total_sum, total_tokens = total_sum + loss_sum, total_tokens + tokens
    overall = report["overall"]
    assert overall["tokens"] == total_tokens
    assert overall["ce"] == pytest.approx(total_sum / total_tokens, rel=FLOAT32_RTOL, abs=0)
    assert overall["mean_ce"] == pytest.approx(sum(f["ce"] for f in report["files"]) / 2, rel=1e-12)
    assert overall["ce"] != pytest.approx(overall["mean_ce"], rel=1e-9)  # token-weighted, not the plain mean


def test_padding_does_not_change_it_merging_evals_own_loop(chat_model, data):
    """merging-eval pads every record to max_length and runs batches of 10 in file order: same sums."""
    root, records = data
    report = evaluate(str(chat_model), load_data_files([root / "code.json"]), EvalOptions(max_length=96))
    model, tokenizer, _ = oracle(chat_model, [], max_length=96)
    loss_sum, tokens = batches_loss(model, padded_batches(tokenizer, records["code"], max_length=96))
    (result,) = report["files"]
    assert result["tokens"] == tokens
    assert result["loss_sum"] == pytest.approx(loss_sum, rel=FLOAT32_RTOL, abs=0)


def test_batches_give_the_same_losses_record_by_record(chat_model, data):
    root, _ = data
    files = load_data_files([root])
    one, many = (evaluate(str(chat_model), files, EvalOptions(batch_size=size)) for size in (1, 37))
    for a, b in zip(one["files"], many["files"], strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss_sum"] == pytest.approx(b["loss_sum"], rel=FLOAT32_RTOL, abs=0)


def test_bfloat16_compute_matches_transformers_in_bfloat16(chat_model, data):
    """bfloat16 (the GPU default, here forced on the CPU): transformers' loss on the bf16 model; only the
    positions' order of bf16 matmuls differs, so the bound is bf16's, not float32's."""
    root, records = data
    report = evaluate(str(chat_model), load_data_files([root / "code.json"]),
                      EvalOptions(dtype="bfloat16", batch_size=8))
    _, _, expected = oracle(chat_model, records["code"], max_length=MAX_POSITIONS, dtype=torch.bfloat16)
    (result,) = report["files"]
    assert report["dtype"] == "bfloat16"
    assert result["tokens"] == sum(t for _, t in expected)
    assert result["ce"] == pytest.approx(math.fsum(s for s, _ in expected) / result["tokens"], rel=1e-2)


def test_answers_cut_away_by_max_length_are_counted_and_named(chat_model, tmp_path):
    """A record whose prompt fills max_length has no answer tokens (merging-eval's labels are all -100): it
    contributes nothing, and the report names it; answers cut short still count what is left."""
    long_prompt = {"instruction": "the model answers every question " * 12, "output": "short"}
    records = make_records(6, seed=9, max_words=3)
    records[2] = long_prompt
    records[4] = dict(long_prompt, output="x")
    records[5] = {"instruction": "solve", "output": "a long answer with many words " * 10}
    path = write_records(tmp_path / "cut.json", records)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    max_length = 48

    def length(record, *, with_answer):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": record["instruction"].strip()},
                    {"role": "assistant", "content": record["output"].strip()}]
        text = tokenizer.apply_chat_template(messages if with_answer else messages[:2], tokenize=False,
                                             add_generation_prompt=not with_answer)
        return len(tokenizer(text)["input_ids"])

    assert [length(r, with_answer=False) >= max_length for r in records] == [False, False, True, False, True, False]
    assert [length(r, with_answer=True) > max_length for r in records] == [False, False, True, False, True, True]
    report = evaluate(str(chat_model), load_data_files([path]), EvalOptions(max_length=max_length, batch_size=3))
    (result,) = report["files"]
    _, _, expected = oracle(chat_model, records, max_length=max_length)
    assert [i for i, (_, tokens) in enumerate(expected) if not tokens] == [2, 4]
    assert result["answer_cut_away"] == [2, 4]
    assert result["answer_shortened"] == 1  # record 5: what is left of its answer is scored
    assert (result["records"], report["overall"]["records"], report["overall"]["answer_cut_away"]) == (6, 6, 2)
    assert result["tokens"] == sum(t for _, t in expected)
    assert result["ce"] == pytest.approx(math.fsum(s for s, _ in expected) / result["tokens"],
                                         rel=FLOAT32_RTOL, abs=0)


def test_limit_evaluates_the_first_records(chat_model, data):
    root, records = data
    report = evaluate(str(chat_model), load_data_files([root / "algebra.jsonl"]), EvalOptions(limit=5, batch_size=2))
    _, _, expected = oracle(chat_model, records["algebra"][:5], max_length=MAX_POSITIONS)
    (result,) = report["files"]
    assert (result["records"], report["limit"]) == (5, 5)
    assert result["tokens"] == sum(t for _, t in expected)
    assert result["loss_sum"] == pytest.approx(math.fsum(s for s, _ in expected), rel=FLOAT32_RTOL, abs=0)


def test_report_is_json_with_the_model_and_settings(chat_model, data):
    root, _ = data
    report = evaluate(str(chat_model), load_data_files([root]), EvalOptions(max_length=64, batch_size=5))
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["model"] == {"ref": str(chat_model), "source": "local", "path": str(chat_model),
                                         "revision": None}
    assert (report["max_length"], report["requested_max_length"], report["batch_size"]) == (64, 64, 5)
    assert [f["name"] for f in report["files"]] == ["algebra", "code"]
    assert report["tokens_per_second"] > 0


def test_prompts_that_fill_max_length_everywhere_fail_before_loading_weights(chat_model, tmp_path):
    path = write_records(tmp_path / "long.json", [{"instruction": "word " * 200, "output": "a"}])
    with pytest.raises(MergeError, match="^data: no answer tokens are left within max_length 16"):
        evaluate(str(chat_model), load_data_files([path]), EvalOptions(max_length=16))


def test_models_without_safetensors_or_chat_template_are_refused(chat_model, data, tmp_path):
    root, _ = data
    files = load_data_files([root / "code.json"])
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((chat_model / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MergeError, match="^model: .*bin-only has only .bin weights, which are never loaded"):
        evaluate(str(bin_only), files, EvalOptions())
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    for item in chat_model.iterdir():
        (no_template / item.name).write_bytes(item.read_bytes())
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="^checkpoint: the tokenizer of .* has no chat template"):
        evaluate(str(no_template), files, EvalOptions(), field="checkpoint")
    with pytest.raises(MergeError, match="^model: .*missing is neither an existing directory nor"):
        evaluate(str(tmp_path / "missing"), files, EvalOptions())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_use_gpu_without_cuda_fails_at_once(chat_model, data):
    root, _ = data
    with pytest.raises(MergeError, match="^use_gpu is set but CUDA is not available$"):
        evaluate(str(chat_model), load_data_files([root]), EvalOptions(use_gpu=True))


def test_models_that_change_logits_after_the_head_run_their_own_forward(chat_model, data, tmp_path):
    """A config with a logit transform (here final_logit_softcapping, which Qwen2 and Llama keep but ignore)
    takes the full forward path: same losses as the head-only path, checked against the oracle."""
    root, records = data
    copy = tmp_path / "softcapped"
    copy.mkdir()
    for item in chat_model.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    files = load_data_files([root / "code.json"])
    full, head_only = (evaluate(str(path), files, EvalOptions(batch_size=6)) for path in (copy, chat_model))
    assert (full["full_forward"], head_only["full_forward"]) == (True, False)
    _, _, expected = oracle(chat_model, records["code"], max_length=MAX_POSITIONS)
    assert full["files"][0]["tokens"] == head_only["files"][0]["tokens"] == sum(t for _, t in expected)
    assert full["files"][0]["loss_sum"] == pytest.approx(math.fsum(s for s, _ in expected), rel=FLOAT32_RTOL, abs=0)
