"""Per-record scores into the evaluation report: per file the token-weighted cross-entropy (sum of the answer
tokens' losses / answer tokens) and its perplexity, overall the same over all files' tokens, and the plain
mean of the files' cross-entropies (merging-eval's "Avg." row beside its "Overall" row)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from modelmerge_engine.evaluation.data import DataFile
from modelmerge_engine.evaluation.encode import EncodedRecord
from modelmerge_engine.evaluation.metric import RecordScore


def cross_entropy(loss_sum: float, tokens: int) -> float | None:
    """None when there is nothing to average, or when the model's losses are not finite (NaN/inf logits)."""
    if not tokens or not math.isfinite(loss_sum):
        return None
    return loss_sum / tokens


def perplexity(ce: float | None) -> float | None:
    if ce is None:
        return None
    try:
        return math.exp(ce)
    except OverflowError:
        return None


def file_results(files: Sequence[DataFile], records: Sequence[EncodedRecord],
                 scores: Sequence[RecordScore]) -> list[dict]:
    results = []
    for file_index, data in enumerate(files):
        mine = [(r, s) for r, s in zip(records, scores, strict=True) if r.file_index == file_index]
        loss_sum = math.fsum(s.loss_sum for _, s in mine)
        tokens = sum(s.tokens for _, s in mine)
        ce = cross_entropy(loss_sum, tokens)
        results.append({
            "name": data.name,
            "path": str(data.path),
            "classification": data.classification,
            "records": len(mine),
            "tokens": tokens,
            "loss_sum": loss_sum if math.isfinite(loss_sum) else None,
            "ce": ce,
            "ppl": perplexity(ce),
            # records whose answer max_length cut away entirely: counted, named, no tokens (as in merging-eval)
            "answer_cut_away": [r.record_index for r, _ in mine if not r.answer_tokens],
            "answer_shortened": sum(1 for r, _ in mine if r.answer_shortened and r.answer_tokens),
        })
    return results


def overall_result(files: Sequence[dict]) -> dict:
    loss_sum = math.fsum(math.nan if f["loss_sum"] is None else f["loss_sum"] for f in files)
    tokens = sum(f["tokens"] for f in files)
    ce = cross_entropy(loss_sum, tokens)
    file_ces = [f["ce"] for f in files if f["ce"] is not None]
    return {
        "ce": ce,
        "ppl": perplexity(ce),
        "tokens": tokens,
        "records": sum(f["records"] for f in files),
        "answer_cut_away": sum(len(f["answer_cut_away"]) for f in files),
        "mean_ce": math.fsum(file_ces) / len(file_ces) if file_ces and len(file_ces) == len(files) else None,
    }
