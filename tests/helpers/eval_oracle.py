"""The evaluation oracle: merging-eval's metric computed the way its scripts/eval.py computes it, with
transformers' own loss, `model(input_ids, attention_mask, labels).loss` times the batch's answer tokens, summed.

Rendering follows the script: system "You are a helpful assistant.", user and assistant stripped, the chat
template as text, the tokenizer called on it (truncated to max_length, padded to max_length in the script's
loop), the prompt with the generation prompt tokenized alone and that many leading labels set to -100, and
padding set to -100."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SYSTEM = "You are a helpful assistant."


def record_texts(record: dict) -> tuple[str, str]:
    prompt = record["instruction"] if "instruction" in record else record["problem"]
    answer = record["output"] if "instruction" in record else record["solution"]
    return prompt.strip(), answer.strip()


def labelled(tokenizer, record: dict, *, max_length: int, pad_to_max_length: bool) -> dict[str, torch.Tensor]:
    prompt, answer = record_texts(record)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(full, return_tensors="pt", truncation=True, max_length=max_length,
                        padding="max_length" if pad_to_max_length else False)
    prefix_length = len(tokenizer(prefix, truncation=True, max_length=max_length)["input_ids"])
    input_ids, attention_mask = encoded["input_ids"][0], encoded["attention_mask"][0]
    labels = input_ids.clone()
    labels[:prefix_length] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_sum_and_tokens(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """transformers' mean loss of one batch times its answer tokens (0, 0 when it has none)."""
    tokens = int((batch["labels"] != -100).sum())
    if not tokens:
        return 0.0, 0
    on_device = {key: value.to(model.device) for key, value in batch.items()}
    with torch.inference_mode():
        loss = model(**on_device).loss
    return loss.item() * tokens, tokens


def per_record(model, tokenizer, records: Sequence[dict], *, max_length: int) -> list[tuple[float, int]]:
    """(loss sum, answer tokens) of each record run alone, without padding."""
    return [loss_sum_and_tokens(model, {k: v[None] for k, v in labelled(
        tokenizer, record, max_length=max_length, pad_to_max_length=False).items()}) for record in records]


def padded_batches(tokenizer, records: Sequence[dict], *, max_length: int,
                   batch_size: int = 10) -> list[dict[str, torch.Tensor]]:
    """merging-eval's batches: every record padded to max_length, `batch_size` records a batch in file order."""
    items = [labelled(tokenizer, record, max_length=max_length, pad_to_max_length=True) for record in records]
    return [{key: torch.stack([item[key] for item in items[start:start + batch_size]]) for key in items[0]}
            for start in range(0, len(items), batch_size)]


def batches_loss(model, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """merging-eval's loop over its batches: (loss sum, answer tokens) of all of them."""
    total, tokens = 0.0, 0
    for batch in batches:
        batch_sum, batch_tokens = loss_sum_and_tokens(model, batch)
        total, tokens = total + batch_sum, tokens + batch_tokens
    return total, tokens
