"""``data.path`` alone, with the task's default data option: every form is recognised and none of
the example's settings leak into the user's job (no engine)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import compose_job
from test_requests import FakeTok
from test_sources import write_dataset, write_jsonl

from sage_vllm_batch.config import validate
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.requests.builder import RequestBuilder, sampling_dict
from sage_vllm_batch.sources import open_source

ROWS = [{"prompt": f"say {i}", "n": i} for i in range(9)]
GENERATE = ("task=generate", "model=smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _forms(tmp_path, form):
    if form in ("parquet", "jsonl", "jsonl.gz", "csv", "csv.gz", "hf_saved"):
        return write_dataset(tmp_path, form, ROWS)[0], "hf" if form == "hf_saved" else form.split(".")[0]
    if form == "json_lines":  # .json holding JSON lines
        return write_jsonl(tmp_path / "d.json", ROWS), "jsonl"
    if form == "json_array":  # .json holding one array
        (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
        return str(tmp_path / "d.json"), "hf"
    if form in ("dir", "glob"):
        d = tmp_path / "parts"
        d.mkdir()
        for k in range(3):
            pq.write_table(pa.Table.from_pylist(ROWS[3 * k : 3 * k + 3]), d / f"p{k}.parquet")
        return (str(d) if form == "dir" else str(d / "p*.parquet")), "parquet"
    raise AssertionError(form)


FORMS = [
    "parquet",
    "jsonl",
    "jsonl.gz",
    "json_lines",
    "json_array",
    "csv",
    "csv.gz",
    "hf_saved",
    "dir",
    "glob",
]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_is_read_through_data_path_alone(tmp_path, form):
    path, fmt = _forms(tmp_path, form)
    cfg = compose_job(*GENERATE, f"data.path={path}", out_dir=tmp_path / "out")
    validate(cfg)
    src = open_source(cfg.data)
    assert src.format == fmt
    table = pa.Table.from_batches(list(src.batches()), schema=src.schema)
    assert table["prompt"].to_pylist() == [r["prompt"] for r in ROWS]
    assert table["__row_id"].to_pylist() == list(range(len(ROWS)))


@pytest.mark.parametrize("task", ["chat", "generate", "embed", "finetune"])
def test_example_settings_apply_only_to_the_example(tmp_path, task):
    model = "minilm-l6-v2" if task == "embed" else "smollm2-135m-instruct"
    example = compose_job(f"task={task}", f"model={model}", out_dir=tmp_path).data
    assert example.path.startswith("pkg://") and example.id_column is not None
    mine = compose_job(f"task={task}", f"model={model}", "data.path=mine.jsonl", out_dir=tmp_path).data
    assert mine.path == "mine.jsonl"
    assert (
        mine.format,
        mine.prompt_template,
        mine.system_prompt,
        mine.id_column,
        mine.limit,
        mine.columns,
    ) == (
        "auto",
        None,
        None,
        None,
        None,
        None,
    )


def test_keys_the_user_sets_are_kept(tmp_path):
    data = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        "data.path=mine.jsonl",
        "data.system_prompt=Be brief.",
        "data.limit=5",
        out_dir=tmp_path,
    ).data
    assert (data.system_prompt, data.limit, data.prompt_template) == ("Be brief.", 5, None)
    # ... and without data.path the example keeps its own settings next to the user's.
    data = compose_job("task=chat", "model=smollm2-135m-instruct", "data.limit=5", out_dir=tmp_path).data
    assert data.limit == 5 and "{prompt}" in data.prompt_template and data.system_prompt


def test_chat_rows_of_a_user_file_are_not_wrapped_in_the_example_prompt(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "What is 2+2?"}])
    cfg = compose_job("task=chat", "model=smollm2-135m-instruct", f"data.path={path}", out_dir=tmp_path / "o")
    tok = FakeTok()
    tok.max_model_len = 512
    seen = []
    tok.render_chat = lambda messages, **kw: seen.append(messages) or [1, 2, 3]
    builder = RequestBuilder(cfg.task, cfg.data, sampling_dict(dict(cfg.sampling)), tok)
    batch = next(open_source(cfg.data).batches())
    req = builder.build(0, batch.to_pylist()[0])
    assert req.error is None
    assert seen == [[{"role": "user", "content": "What is 2+2?"}]]


@pytest.mark.parametrize("name", ["notes.txt", "blob.bin"])
def test_an_unrecognised_form_names_data_format_and_the_choices(tmp_path, name):
    (tmp_path / name).write_text("hello\n")
    cfg = compose_job(*GENERATE, f"data.path={tmp_path / name}", out_dir=tmp_path / "o")
    with pytest.raises(DataError, match=r"data\.format.*parquet, jsonl, csv, hf, openai_batch"):
        open_source(cfg.data)


def test_a_directory_of_unknown_files_names_data_format(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x\n")
    cfg = compose_job(*GENERATE, f"data.path={tmp_path / 'd'}", out_dir=tmp_path / "o")
    with pytest.raises(DataError, match=r"data\.format"):
        open_source(cfg.data)


def test_data_equals_a_path_says_what_to_type(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "sage_vllm_batch", "task=embed", "data=corpus/"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    assert "write data.path=corpus/" in r.stderr and "example_embed" in r.stderr
