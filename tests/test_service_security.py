"""Unit tests of the job checks of the service (no engine)."""

from __future__ import annotations

import json

import pytest
from helpers import compose_job

from sage_vllm_batch.config.validate import template_columns, validate
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.service.security import (
    api_key_ok,
    check_data_path,
    check_job,
    check_output_dir,
    check_overrides,
)
from sage_vllm_batch.service.service import ServiceError


@pytest.mark.parametrize(
    "override, key",
    [
        ("model=minilm-l6-v2", "model"),
        ("model.id=org/x", "model.id"),
        ("+engine.extra.x=1", "engine.extra.x"),
        ("registry.root=/tmp", "registry.root"),
        ("hydra.run.dir=/tmp", "hydra.run.dir"),
        ("serve.data_roots=[/]", "serve.data_roots"),
        ("~engine", "engine"),
        ("executor=ray", "executor"),
        ("executor.num_workers=4", "executor.num_workers"),
        ("progress=json", "progress"),
        ("verbose=true", "verbose"),
        ("job_name=x", "job_name"),
        ("mode=run", "mode"),
        ("embedding_model=minilm-l6-v2", "embedding_model"),
        ("hydra/launcher=basic", "hydra/launcher"),
        ("+new_key=1", "new_key"),
        ("++serve.port=1", "serve.port"),
        ("~data.limit", "data.limit"),  # deleting a key the job may otherwise set
        ("data@model=jsonl", "data"),  # a package move
        ("task.type=chat", "task.type"),  # the task is chosen with task=...
        ("task.finetune.epochs=2", "task.finetune.epochs"),
        ("output.overwrite=true", "output.overwrite"),
        ("output.openai_batch=true", "output.openai_batch"),
        ("output.vector_store={path:/tmp}", "output.vector_store"),
        ("output.vector_storeX=1", "output.vector_storeX"),
        ("output.vector_store.url=postgresql://u@db:5432/x", "output.vector_store.url"),  # a database
        ("output.vector_store.type=pgvector", "output.vector_store.type"),
        ("datax.path=/x", "datax.path"),
    ],
)
def test_fixed_sections_are_refused_naming_the_key(override, key):
    with pytest.raises(ServiceError) as e:
        check_overrides(["task=chat", override])
    assert e.value.status == 403 and repr(key) in str(e.value)


def test_refusals_name_the_allowed_set():
    with pytest.raises(ServiceError) as e:
        check_overrides(["executor=ray"])
    msg = str(e.value)
    assert "'executor'" in msg and "task=chat|classify|embed|generate|pipeline" in msg and "data.*" in msg
    assert "output=parquet|openai_batch|lancedb|faiss" in msg and "output.vector_store.table" in msg


ALLOWED = [
    "task=chat",
    "task=embed",
    "task=generate",
    "data=jsonl",
    "data=example_chat",
    "sampling=creative",
    "output=lancedb",
    "output=faiss",
    "output=openai_batch",
    "output=parquet",
    "data.path=/data/x.jsonl",
    "data.path='/data/with space.jsonl'",
    "data.prompt_template='Q: {prompt}'",
    "data.columns=[prompt,id]",
    "+data.limit=3",  # + / ++ on an allowed key: Hydra then says whether the key exists
    "++sampling.max_tokens=8",
    "sampling.stop=[a,b]",
    "sampling.structured_outputs.json={type:object}",
    "sampling.structured_outputs.choice=[yes,no]",
    "task.overlong_prompt=truncate",
    "task.normalize=true",
    "task.add_generation_prompt=false",
    "+task.chat_template_kwargs.enable_thinking=false",
    "output.dir=/out/x",
    "output.shard_rows=4",
    "output.passthrough_columns=[prompt]",
    "output.compression=snappy",
    "output.vector_store.type=lancedb",
    "output.vector_store.table=vecs",
    "output.vector_store.path=/out/v",
]


def test_what_a_job_owns_is_allowed():
    assert check_overrides(ALLOWED) == ALLOWED


@pytest.mark.parametrize(
    "override, status, needle",
    [
        ("task=finetune", 403, "fine_tune"),
        ("task=plan", 403, "chat, classify, embed, generate, pipeline"),
        ("output=bogus", 403, "parquet, openai_batch, lancedb, faiss"),
        ("output=pgvector", 403, "may not name a database"),
        ("output.vector_store.url='postgresql://u:pw@db/x'", 403, "may not name a database"),
        ("data=nope", 403, "jsonl"),
        ("data=base_data", 403, "jsonl"),
        ("sampling=base_sampling", 403, "creative"),
        ("sampling.temperature=0,0.5", 400, "sweep"),
        ("sampling.temperature=range(0,1,0.5)", 400, "sweep"),
        ("sampling.temperature=choice(0,1)", 400, "sweep"),
        ("data=glob(*)", 400, "sweep"),
        ("data.path=${oc.env:HOME}", 403, "interpolations"),
        ("data.path='${oc.env:HOME}'", 403, "interpolations"),
        ("data.path=/data/${oc.env:USER}.jsonl", 403, "interpolations"),
        ("output.dir=${hydra:runtime.cwd}", 403, "interpolations"),
        ("data.path=\\${oc.env:HOME}", 403, "interpolations"),  # escaped: still refused, never resolved
        ("data.system_prompt=${data.path}", 403, "interpolations"),
        ("sampling.stop=[a,'${oc.env:HOME}']", 403, "interpolations"),
        ("sampling.structured_outputs.json={a:'${oc.env:HOME}'}", 403, "interpolations"),
        ("sampling.structured_outputs.json={x${oc.env:HOME}:1}", 400, "key=value"),  # not a key either
        ("novalue", 400, "key=value"),
        ("data.path='/x", 400, "key=value"),
    ],
)
def test_choices_sweeps_and_interpolations(override, status, needle):
    with pytest.raises(ServiceError) as e:
        check_overrides(["task=chat", override])
    assert e.value.status == status and needle in str(e.value), str(e.value)


def test_job_overrides_shape():
    assert check_overrides(["task=chat", "data.path=/x"]) == ["task=chat", "data.path=/x"]
    for bad in ("task=chat", [1], ["novalue"]):
        with pytest.raises(ServiceError):
            check_overrides(bad)


@pytest.mark.parametrize(
    "template",
    [
        "{prompt.__class__}",
        "{prompt[0]}",
        "{0}",
        "{}",
        "x {prompt!r}",
        "{prompt:>10}",
        "{p:{q.__class__}}",
        "{p",
        "}",
    ],
)
def test_prompt_templates_use_plain_column_fields_only(template):
    with pytest.raises(ConfigError, match="data.prompt_template"):
        template_columns(template)
    # Every entry point validates it: a batch run fails before any work starts, naming the key.
    cfg = compose_job(
        "task=generate",
        "model=smollm2-135m-instruct",
        "data=jsonl",
        "data.path=/x.jsonl",
        f"data.prompt_template='{template}'",
    )
    with pytest.raises(ConfigError, match="data.prompt_template"):
        validate(cfg)


def test_plain_template_fields_pass():
    assert template_columns("Q: {question}\n{{literal}} {a b}") == ["question", "a b"]
    validate(
        compose_job("task=chat", "model=smollm2-135m-instruct", "data=example_chat")
    )  # the packaged example's template


def test_data_paths_must_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "ok.jsonl").write_text("{}\n")
    (outside / "s.jsonl").write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside / "s.jsonl")
    (root / "sub").mkdir()
    (root / "sub" / "dirlink").symlink_to(outside)
    check_data_path(str(root / "ok.jsonl"), [str(root)])
    check_data_path(str(root / "*.jsonl").replace("*.jsonl", "ok*.jsonl"), [str(root)])
    for bad in (
        root / "link.jsonl",  # a symlink out
        f"{root}/../outside/s.jsonl",  # ../
        outside / "s.jsonl",  # absolute, elsewhere
        root / "*.jsonl",  # a glob matching the symlink
        root / "sub",  # a directory holding a link out
    ):
        with pytest.raises(ServiceError, match="data.path"):
            check_data_path(str(bad), [str(root)])
    with pytest.raises(ServiceError, match="serve.data_roots"):
        check_data_path(str(root / "ok.jsonl"), [])


def test_output_dir_inside_the_root(tmp_path):
    assert (
        check_output_dir(str(tmp_path / "o" / "job"), str(tmp_path / "o"))
        == (tmp_path / "o" / "job").resolve()
    )
    with pytest.raises(ServiceError, match="output.dir"):
        check_output_dir(str(tmp_path / "o" / ".." / "x"), str(tmp_path / "o"))


def test_api_key_check():
    assert api_key_ok("Bearer k1", "k1") and api_key_ok("bearer k1", "k1")
    assert not api_key_ok("Bearer k2", "k1") and not api_key_ok(None, "k1") and not api_key_ok("k1", "k1")


def test_a_reader_choice_cannot_open_files_outside_the_roots(tmp_path):
    """``data.format=hf data.hf_loader=text`` reads ``.txt`` files, which a check of data files
    alone would skip: every file the reader opens, and every entry the path names, is checked."""
    from omegaconf import OmegaConf

    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "a.jsonl").write_text("{}\n")
    (outside / "secret.txt").write_text("secret\n")
    (root / "b.txt").symlink_to(outside / "secret.txt")
    for path in (root, root / "*.txt"):
        data = OmegaConf.create({"path": str(path), "format": "hf", "hf_loader": "text"})
        with pytest.raises(ServiceError, match="outside the server's data roots"):
            check_data_path(str(path), [str(root)], data=data)
    (root / "b.txt").unlink()
    (root / "b.txt").write_text("fine\n")
    check_data_path(
        str(root),
        [str(root)],
        data=OmegaConf.create({"path": str(root), "format": "hf", "hf_loader": "text"}),
    )


@pytest.fixture
def roots(tmp_path):
    data, out, outside = tmp_path / "data", tmp_path / "out", tmp_path / "outside"
    for d in (data, out, outside):
        d.mkdir()
    (data / "q.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (data / "schema.json").write_text(json.dumps({"type": "object"}))
    (outside / "schema.json").write_text(json.dumps({"type": "object"}))
    (data / "schema_link.json").symlink_to(outside / "schema.json")
    (out / "link").symlink_to(outside)
    return {"data": data, "out": out, "outside": outside}


def _job(roots, *overrides, task="chat"):
    return compose_job(
        f"task={task}", "data=jsonl", f"data.path={roots['data'] / 'q.jsonl'}", *overrides,
        out_dir=roots["out"] / "jobs" / "j1",
    )  # fmt: skip


def _check(roots, cfg):
    return check_job(cfg, data_roots=[str(roots["data"])], output_root=str(roots["out"]))


def test_a_composed_job_inside_the_roots_passes(roots):
    assert _check(roots, _job(roots)) == (roots["out"] / "jobs" / "j1").resolve()
    _check(roots, _job(roots, f"sampling.structured_outputs.json={roots['data'] / 'schema.json'}"))
    _check(roots, _job(roots, 'sampling.structured_outputs.json=\'{"type": "object"}\''))
    _check(roots, _job(roots, "output=lancedb", task="embed"))
    _check(roots, _job(roots, "+task.chat_template_kwargs.enable_thinking=false"))


@pytest.mark.parametrize(
    "make, key",
    [
        (
            lambda r: [f"sampling.structured_outputs.json={r['outside'] / 'schema.json'}"],
            "sampling.structured_outputs.json",
        ),
        (
            lambda r: [f"sampling.structured_outputs.json={r['data'] / 'schema_link.json'}"],
            "sampling.structured_outputs.json",
        ),
        (
            lambda r: [f"sampling.structured_outputs.json={r['data']}/../outside/schema.json"],
            "sampling.structured_outputs.json",
        ),
        (lambda r: ["sampling.structured_outputs.json='~/schema.json'"], "sampling.structured_outputs.json"),
        (
            lambda r: ["sampling.structured_outputs.json=pkg://bible/data/kjv.jsonl"],
            "sampling.structured_outputs.json",
        ),
        (lambda r: ["data.path=pkg://bible/data/kjv.jsonl"], "data.path"),
        (lambda r: ["data.path='~/q.jsonl'"], "data.path"),
        (lambda r: ["data.path=pkg://antigravity.x/y.jsonl"], "data.path"),  # would import antigravity
        (lambda r: ["data.hf_loader=some/hub_dataset"], "data.hf_loader"),
        (lambda r: [f"data.hf_loader={r['data']}"], "data.hf_loader"),  # a local loading script dir
        (lambda r: [f"output.dir={r['out']}"], "output.dir"),  # the root itself is the server's
        (lambda r: [f"output.dir={r['out'] / 'link' / 'x'}"], "output.dir"),
        (lambda r: ["output.dir='~/x'"], "output.dir"),
        (lambda r: ["output.dir=pkg://bible/x"], "output.dir"),
        (
            lambda r: ["output=lancedb", f"output.vector_store.path={r['outside']}"],
            "output.vector_store.path",
        ),
        (
            lambda r: ["output=faiss", f"output.vector_store.path={r['out'] / 'link'}"],
            "output.vector_store.path",
        ),
        (lambda r: ["output=lancedb", "output.vector_store.path='~/v'"], "output.vector_store.path"),
        (
            lambda r: ["output=lancedb", "output.vector_store.table=../../../outside/t"],
            "output.vector_store.table",
        ),
        (lambda r: ["output=lancedb", "output.vector_store.table=a/b"], "output.vector_store.table"),
        (lambda r: ["+task.chat_template_kwargs.chat_template=x"], "task.chat_template_kwargs"),
        (lambda r: ["+task.chat_template_kwargs.tools=[]"], "task.chat_template_kwargs"),
    ],
)
def test_every_path_of_the_composed_job_is_confined(roots, make, key):
    task = "embed" if any("vector_store" in o or o.startswith("output=") for o in make(roots)) else "chat"
    with pytest.raises(ServiceError) as e:
        _check(roots, _job(roots, *make(roots), task=task))
    assert e.value.status in (400, 403) and key in str(e.value), str(e.value)
    assert sorted(p.name for p in roots["outside"].iterdir()) == ["schema.json"]


def test_a_composed_job_may_not_name_a_database(roots):
    """Whatever set it (an override, a preset), a job over HTTP does not write to a database."""
    url = "output.vector_store.url='postgresql://u:secretpw@db.internal:5432/x'"
    for overrides, key in (
        (["output=pgvector", url], "output.vector_store.url"),
        (["output=pgvector"], "output.vector_store.type"),
        (["output=lancedb", url], "output.vector_store.url"),
    ):
        with pytest.raises(ServiceError) as e:
            _check(roots, _job(roots, *overrides, task="embed"))
        assert e.value.status == 403 and key in str(e.value) and "database" in str(e.value)
        assert "secretpw" not in str(e.value)


def test_a_preset_path_is_checked_too(roots):
    """The default data of task=chat is a packaged corpus (pkg://): not below the data roots."""
    cfg = compose_job("task=chat", out_dir=roots["out"] / "jobs" / "j2")
    with pytest.raises(ServiceError, match="data.path"):
        _check(roots, cfg)
