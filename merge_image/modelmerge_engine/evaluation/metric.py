"""The metric itself: the summed cross-entropy of each record's answer tokens and how many there are.

Records are sorted by length (longest first) and run `batch_size` at a time, right-padded to the longest of
the batch; padding is masked out of attention and never scored, and a causal model's real positions do not
see the padding after them, so batching does not change a record's losses. Only the positions that predict an
answer token go through the output head (in the model's dtype, as transformers does), and their logits are
taken to float32 for the cross-entropy, as transformers' loss does; sums are kept in float64. Models whose
forward changes the logits after the head (soft-capping, logit scales) run their full forward instead."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelmerge_engine.evaluation.encode import EncodedRecord

HEAD_CHUNK_ELEMENTS = 1 << 26  # logits computed at once (256 MiB in float32)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class RecordScore:
    loss_sum: float  # summed cross-entropy (nats) of the answer tokens
    tokens: int  # answer tokens scored


def score_records(model, records: Sequence[EncodedRecord], *, batch_size: int,
                  on_batch: Callable[[int], None] = lambda tokens: None) -> list[RecordScore]:
    """One score per record, in the order given; `on_batch` is told the tokens of each batch run."""
    import torch

    scores = [RecordScore(0.0, 0)] * len(records)
    order = sorted((i for i, record in enumerate(records) if record.answer_tokens),
                   key=lambda i: len(records[i].input_ids), reverse=True)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [records[i] for i in order[start:start + batch_size]]
            sums, counts = _score_batch(model, batch)
            for i, loss_sum, tokens in zip(order[start:start + batch_size], sums, counts, strict=True):
                scores[i] = RecordScore(loss_sum, tokens)
            on_batch(sum(len(record.input_ids) for record in batch))
    return scores


def _score_batch(model, batch: Sequence[EncodedRecord]) -> tuple[list[float], list[int]]:
    import torch

    device = model.device
    width = max(len(record.input_ids) for record in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, positions = [], []  # (row, position) of each position that predicts an answer token
    for row, record in enumerate(batch):
        length = len(record.input_ids)
        input_ids[row, :length] = torch.tensor(record.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        predicting = torch.arange(max(record.answer_start, 1) - 1, length - 1)
        rows.append(torch.full_like(predicting, row))
        positions.append(predicting)
    row_index, position_index = torch.cat(rows), torch.cat(positions)
    targets = input_ids[row_index, position_index + 1].to(device)
    logits = _answer_logits(model, input_ids.to(device), attention_mask.to(device), row_index.to(device),
                            position_index.to(device))
    losses = torch.cat([torch.nn.functional.cross_entropy(chunk.float(), target, reduction="none")
                        for chunk, target in zip(logits, targets.split([len(c) for c in logits]), strict=True)])
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
    sums.index_add_(0, row_index.to(device), losses.double())
    counts = torch.bincount(row_index, minlength=len(batch))
    return sums.tolist(), counts.tolist()


def _answer_logits(model, input_ids, attention_mask, row_index, position_index) -> list:
    """The logits at the predicting positions, in chunks of at most HEAD_CHUNK_ELEMENTS values."""
    vocab = model.config.get_text_config().vocab_size
    step = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    if uses_full_forward(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return list(logits[row_index, position_index].split(step))
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    selected = hidden[row_index, position_index]
    head = model.get_output_embeddings()
    return [head(chunk) for chunk in selected.split(step)]


def uses_full_forward(model) -> bool:
    """Whether the logits must come from the model's own forward (it changes them after the output head, or
    its decoder and head cannot be reached)."""
    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in _LOGIT_TRANSFORMS):
        return True
    try:
        return model.get_decoder() is None or model.get_output_embeddings() is None
    except (AttributeError, NotImplementedError):
        return True
