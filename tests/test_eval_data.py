"""Evaluation data files: both layouts in JSON and JSON Lines, directories, --limit, and every kind of bad data
refused with the file and the record named (no model involved: this is checked before any model loads)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from modelmerge_engine.evaluation.data import load_data_files
from modelmerge_engine.evaluation.options import EvalInputError, EvalOptions
from tests.helpers.eval_data import make_records, write_records


def test_json_and_jsonl_records_in_both_layouts(tmp_path):
    instructions = make_records(5, seed=1)
    problems = make_records(4, seed=2, layout=("problem", "solution"))
    problems[0]["classification"] = "Algebra"
    files = load_data_files([write_records(tmp_path / "code.json", instructions),
                             write_records(tmp_path / "algebra.jsonl", problems, jsonl=True)])
    assert [f.name for f in files] == ["code", "algebra"]
    assert [len(f.records) for f in files] == [5, 4]
    assert files[0].records[2].prompt == instructions[2]["instruction"].strip()
    assert files[0].records[2].answer == instructions[2]["output"].strip()
    assert files[1].records[3].prompt == problems[3]["problem"].strip()
    assert files[1].records[3].answer == problems[3]["solution"].strip()
    assert [r.index for r in files[1].records] == [0, 1, 2, 3]
    assert (files[0].classification, files[1].classification) == (None, "algebra")


def test_instruction_wins_over_problem_as_in_merging_eval(tmp_path):
    record = {"instruction": "i", "output": "o", "problem": "p", "solution": "s"}
    (data,) = load_data_files([write_records(tmp_path / "both.json", [record])])
    assert (data.records[0].prompt, data.records[0].answer) == ("i", "o")


def test_directory_takes_json_and_jsonl_files_in_name_order(tmp_path):
    write_records(tmp_path / "b.jsonl", make_records(2), jsonl=True)
    write_records(tmp_path / "a.json", make_records(3))
    (tmp_path / "notes.txt").write_text("not data")
    files = load_data_files([tmp_path])
    assert [(f.name, len(f.records)) for f in files] == [("a", 3), ("b", 2)]


def test_limit_keeps_the_first_records_of_each_file(tmp_path):
    records = make_records(9)
    (data,) = load_data_files([write_records(tmp_path / "d.json", records)], limit=4)
    assert [r.prompt for r in data.records] == [r["instruction"].strip() for r in records[:4]]


def test_blank_lines_in_jsonl_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"instruction": "a", "output": "b"}\n\n{"problem": "c", "solution": "d"}\n')
    (data,) = load_data_files([path])
    assert [(r.index, r.prompt, r.answer) for r in data.records] == [(0, "a", "b"), (1, "c", "d")]


BAD_RECORDS = [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "record 1: missing 'output'"),
    ([{"problem": "a"}], "record 0: missing 'solution'"),
    ([{"question": "a", "answer": "b"}], "record 0: missing 'instruction' or 'problem'"),
    ([{"instruction": "a", "output": 3}], "record 0: 'output' must be a string, got int"),
    ([{"instruction": ["a"], "output": "b"}], "record 0: 'instruction' must be a string, got list"),
    ([{"instruction": "a", "output": "b"}, "text"], "record 1: expected an object"),
    ([{"instruction": "a", "output": "  \n"}], "record 0: 'output' is empty"),
    ([], "no records"),
]


@pytest.mark.parametrize(("records", "message"), BAD_RECORDS)
@pytest.mark.parametrize("jsonl", [False, True])
def test_bad_records_name_the_file_and_the_record(tmp_path, records, message, jsonl):
    path = write_records(tmp_path / ("bad.jsonl" if jsonl else "bad.json"), records, jsonl=jsonl)
    with pytest.raises(EvalInputError) as error:
        load_data_files([write_records(tmp_path / "good.json", make_records(2)), path])
    assert str(error.value).startswith(f"data file {path}: {message}"), str(error.value)


@pytest.mark.parametrize(("text", "message"), [
    ("", "no records"),
    ("  \n\n", "no records"),
    ('[{"instruction": "a", "output": "b"},', "not valid JSON: Expecting value at line 1 column 38"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
     "record 1 (line 2) is not valid JSON"),
    ("instruction,output\na,b\n", "record 0 (line 1) is not valid JSON"),
])
def test_unreadable_files_are_named(tmp_path, text, message):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(EvalInputError, match="^" + re.escape(f"data file {path}: {message}")):
        load_data_files([path])


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"[\xff\xfe]")
    with pytest.raises(EvalInputError, match=f"^data file {path}: not UTF-8 text"):
        load_data_files([path])


def test_missing_paths_empty_directories_and_name_clashes(tmp_path):
    with pytest.raises(EvalInputError, match=f"^data: {tmp_path / 'nope.json'} does not exist"):
        load_data_files([tmp_path / "nope.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="^data: directory .*empty has no .json or .jsonl files"):
        load_data_files([tmp_path / "empty"])
    first = write_records(tmp_path / "a" / "code.json", make_records(1))
    second = write_records(tmp_path / "b" / "code.jsonl", make_records(1), jsonl=True)
    with pytest.raises(EvalInputError, match="^data: two data files are named 'code'"):
        load_data_files([first, second])
    with pytest.raises(EvalInputError, match="^data: at least one"):
        load_data_files([])


@pytest.mark.parametrize(("options", "message"), [
    ({"max_length": 1}, "max_length: must be at least 2, got 1"),
    ({"batch_size": 0}, "batch_size: must be at least 1, got 0"),
    ({"limit": 0}, "limit: must be at least 1, got 0"),
    ({"batch_size": 2.5}, "batch_size: expected an integer, got 2.5"),
    ({"max_length": True}, "max_length: expected an integer, got True"),
    ({"dtype": "int8"}, "dtype: must be one of bfloat16, float16, float32, got 'int8'"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(EvalInputError) as error:
        EvalOptions(**options)
    assert str(error.value) == message


def test_default_dtype_is_merging_evals_choice():
    assert EvalOptions().compute_dtype == "float32"
    assert EvalOptions(use_gpu=True).compute_dtype == "bfloat16"
    assert EvalOptions(use_gpu=True, dtype="float32").compute_dtype == "float32"


def test_data_checks_and_the_merge_path_import_neither_torch_nor_the_metric():
    """The CPU merge image has no torch: checking data and options needs none, and merging (which checks an
    evaluation's data before it starts) never imports torch, transformers or the metric's modules."""
    evaluation = ("import sys, modelmerge_engine.evaluation.run, modelmerge_engine.evaluation.data\n"
                  "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
                  "assert not heavy, heavy")
    merge = ("import sys, modelmerge_engine.run, modelmerge_engine.engine, modelmerge.cli\n"
             "metric = ('loading', 'encode', 'metric', 'report')\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or "
             "m.startswith(tuple(f'modelmerge_engine.evaluation.{name}' for name in metric)))\n"
             "assert not loaded, loaded")
    for code in (evaluation, merge):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
