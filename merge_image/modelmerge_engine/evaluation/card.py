"""The evaluation part of a merged model's card (README.md): the merged model against its base and fine-tunes,
overall and per data file, from the `evaluation` section of merge_report.json (evaluation/after_merge.py)."""

from __future__ import annotations

from modelmerge_engine.evaluation.after_merge import merge_evaluation

LISTED_RECORDS = 20  # record indices named per file; merge_report.json names them all


def evaluation_card(section: dict) -> list[str]:
    """Markdown lines: how it was measured, the table, the best input, each file's counts, or the failure."""
    summary = merge_evaluation(section)
    options = section["options"]
    limit = f", the first {options['limit']} records of each file" if options["limit"] else ""
    lines = ["## Evaluation", "",
             "merging-eval's metric: the token-weighted cross-entropy (CE) of the answers of chat-templated "
             "instruction/answer records, prompt masked; lower is better; PPL = exp(CE). Data: "
             f"{', '.join(_code(d['ref']) for d in section['data'])}; {section['dtype']} on {section['device']}, "
             f"max_length {options['max_length']}, batch size {options['batch_size']}{limit}.", ""]
    if section["state"] == "Failed":
        lines += [f"**The evaluation failed** (the merged model was kept): {section['message']}", ""]
    rows = []
    if section["merged"] is not None:
        rows.append(("this merge", "merged", section["merged"]))
    finetunes = 0
    for baseline in section["baselines"]:
        finetunes += baseline["role"] == "finetuned"
        role = "base" if baseline["role"] == "base" else f"fine-tune {finetunes}"
        rows.append((_code(baseline["model"]), role, baseline["report"]))
    if not rows:
        return lines
    names = [f["name"] for f in rows[0][2]["files"]]
    lines += ["| model | role | CE | PPL | " + " | ".join(f"{_cell(name)} CE" for name in names) + " |",
              "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for model, role, report in rows:
        overall = report["overall"]
        per_file = " | ".join(_number(f["ce"]) for f in report["files"])
        lines.append(f"| {model} | {role} | {_number(overall['ce'])} | {_number(overall['ppl'], 3)} | {per_file} |")
    lines.append("")
    if summary.bestInput is not None and summary.overall is not None:
        lines += [f"Best input: {_code(summary.bestInput)} with CE {_number(summary.bestInputCe)}; this merge: "
                  f"{_number(summary.overall.ce)}.", ""]
    merged = section["merged"]
    if merged is not None:
        lines += ["This merge per data file:", "",
                  "| data file | CE | PPL | records | answer tokens | answers cut away by max_length (records) |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for f in merged["files"]:
            cut = ", ".join(map(str, f["answer_cut_away"][:LISTED_RECORDS])) or "-"
            if len(f["answer_cut_away"]) > LISTED_RECORDS:
                cut += f", ... ({len(f['answer_cut_away'])} records)"
            lines.append(f"| {_cell(f['name'])} | {_number(f['ce'])} | {_number(f['ppl'], 3)} | {f['records']} | "
                         f"{f['tokens']} | {cut} |")
        lines.append("")
    return lines


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"
