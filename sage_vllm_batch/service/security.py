"""What a job submitted over HTTP may touch: its overrides (an allowlist), every file its composed
config names (confined to the server's roots, symlinks followed), and the API key check.

A job owns its data, its sampling and where its output goes; the server owns everything else
(the loaded model and engine, the registry, the executor, Hydra, the serve settings, logging).
Keys are allowed by name, so a key added to the schema later is refused until someone decides
a job may set it.
"""

from __future__ import annotations

import functools
import glob
import hmac
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sage_vllm_batch.config.options import group_options
from sage_vllm_batch.errors import one_line
from sage_vllm_batch.service.errors import BadRequest, Forbidden, ServiceError
from sage_vllm_batch.service.stage_keys import check_stage_override, stage_keys_summary

__all__ = [
    "ServiceError",
    "api_key_ok",
    "check_data_path",
    "check_job",
    "check_output_dir",
    "check_overrides",
]

# Option choices a job may make, per config group. task: finetune trains (VLLMService.fine_tune),
# it is not a run on the served engine. output: every sink there is; listed by name so that a
# new output option is a decision, not a default. data and sampling: any option of the group
# (each sets only that group's keys; the composed paths are checked whatever sets them).
TASKS = ("chat", "classify", "embed", "generate", "pipeline")
OUTPUTS = ("parquet", "openai_batch", "lancedb", "faiss")
# Not output=pgvector, nor output.vector_store.url: a job over HTTP may not name a database (it
# would reach any server the service can, with the service's PGPASSWORD).
_NO_DATABASE = "a job over HTTP may not name a database"
ANY_OPTION = ("data", "sampling")
# Keys a job may set. "x.*": x and every key below it.
#   data.*, sampling.*: the job's input and its decoding (the paths in them are confined below).
#   task.overlong_prompt / normalize / add_generation_prompt: how each row becomes a request.
#   task.chat_template_kwargs.*: variables of the model's chat template (e.g. enable_thinking);
#     the tokenizer's own arguments are refused by name (check_job).
#   task.labels: task=classify's labels.
#   stages.*: task=pipeline's stages, key by key (:mod:`.stage_keys`: names, keys and conditions
#     checked); a stage's model must be the served one of its kind (checked once composed).
#   task.type is not here: the task is chosen with task=..., which also picks the engine.
#   output.overwrite is not here: it would delete another job's committed output.
JOB_KEYS = (
    "data.*",
    "sampling.*",
    "task.overlong_prompt",
    "task.normalize",
    "task.add_generation_prompt",
    "task.chat_template_kwargs.*",
    "task.labels",
    "output.dir",
    "output.shard_rows",
    "output.passthrough_columns",
    "output.compression",
    "output.vector_store.type",
    "output.vector_store.table",
    "output.vector_store.path",
)
# data.hf_loader names a datasets builder: a Hub name or a local script directory would fetch or
# run code, so only the packaged builders of local files (sources.hf.LOADER_EXTS).
HF_LOADERS = ("json", "csv", "parquet", "text", "arrow")
# A LanceDB table is the directory <store>/<table>.lance (removed and rewritten on a rerun).
_TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def allowed_summary() -> str:
    return (
        f"task={'|'.join(TASKS)}, data=<option of conf/data>, sampling=<option of conf/sampling>, "
        f"output={'|'.join(OUTPUTS)}, {', '.join(JOB_KEYS)}, {stage_keys_summary()}"
    )


def _refuse(key: str, why: str = "") -> Forbidden:
    return Forbidden(
        f"overrides: {key!r} may not be set by a job over HTTP{f' ({why})' if why else ''}: the server owns its "
        f"model, engine, registry, executor, logging, hydra and serve settings; a job may set only {allowed_summary()}"
    )


def key_allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and (key == k[:-2] or key.startswith(k[:-1]))) for k in JOB_KEYS)


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_has_interpolation(k) or _has_interpolation(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_interpolation(v) for v in value)
    return False


def check_overrides(overrides: Any) -> list[str]:
    """A job's override list, parsed as Hydra parses it, or a 400/403 naming the offending entry.

    Refused: keys outside :data:`JOB_KEYS` and the option choices above (whatever the syntax:
    ``+``/``++`` adds, ``~`` deletions, ``key@package`` moves), sweeps (a job is one run), and
    values holding an interpolation (``${oc.env:...}``, ``${hydra:...}``, any resolver: they run
    on the server and can read its environment and files).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise BadRequest('overrides: expected a list of strings like "data.path=/data/x.jsonl"')
    parser = OverridesParser.create()
    for o in overrides:
        try:
            ov = parser.parse_override(o)
        except HydraException as e:
            raise BadRequest(f"overrides: {o!r} is not a key=value override ({one_line(e, 300)})") from e
        key = ov.key_or_group
        if ov.package is not None:
            raise _refuse(key, f"{key}@{ov.package}: a job may not move config packages")
        if ov.type == OverrideType.DEL:
            raise _refuse(key, f"~{key}: a job may not delete config keys")
        if ov.is_sweep_override():
            raise BadRequest(
                f"overrides: {o!r} is a sweep; a job is one run (post one job per value, or sweep in batch mode with -m)"
            )
        value = ov.value()
        if _has_interpolation(value):
            raise Forbidden(
                f"overrides: {key}: interpolations (${{...}}) are not allowed in a job's values: they are "
                "resolved on the server and can read its environment and files; give the value itself"
            )
        if key in ("task", "output", *ANY_OPTION):
            choices = {"task": TASKS, "output": OUTPUTS}.get(key) or group_options(key)
            if value not in choices or str(value).startswith("base_"):
                hint = {
                    "finetune": " (fine-tuning is not a serving job: use the fine_tune call)",
                    "pgvector": f" ({_NO_DATABASE})",
                }.get(str(value), "")
                raise Forbidden(
                    f"overrides: {key}={value!r} is not a choice a job may make; choose one of "
                    f"{', '.join(c for c in choices if not c.startswith('base_'))}{hint}"
                )
        elif key == "stages" or key.startswith("stages."):
            check_stage_override(key, value, adds=ov.type in (OverrideType.ADD, OverrideType.FORCE_ADD))
        elif key == "output.vector_store.url" or (key == "output.vector_store.type" and value == "pgvector"):
            raise _refuse(key, _NO_DATABASE)
        elif not key_allowed(key):
            raise _refuse(key)
    return list(overrides)


# ---------------------------------------------------------------------------- paths
def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(str(p)))


def _plain_path(key: str, path: str, *, pkg: bool) -> None:
    """``~`` is refused (the readers and writers do not all expand it, so the path checked would
    not be the path opened); ``pkg://`` only where the runner resolves it (``data.path``)."""
    if path.startswith("~"):
        raise Forbidden(f"{key}: {path!r} starts with ~; give the absolute path")
    from sage_vllm_batch.storage import is_uri, redact

    if is_uri(path) or path.lower().startswith("file://"):  # roots confine local paths only
        raise Forbidden(f"{key}: {redact(path)!r}: a job over HTTP reads and writes local paths only")
    if not pkg and path.startswith("pkg://"):
        raise Forbidden(f"{key}: {path!r}: pkg:// paths are only for data.path")


def check_data_path(path: str, data_roots: Iterable[str], key: str = "data.path", data: Any = None) -> None:
    """Everything the job could read must resolve, symlinks followed, inside one of ``data_roots``:
    what the path names (the path itself, the fixed leading part of a glob, then every match of the
    glob and every entry below a directory, whichever reader a later setting picks) and the files
    its reader opens (``data``, the job's data section, resolved by the sources' own
    :func:`~sage_vllm_batch.sources.source_files`). Nothing outside a root is listed or opened."""
    from sage_vllm_batch.errors import DataError
    from sage_vllm_batch.paths import resolve_path

    roots = [_real(r) for r in data_roots]
    if not roots:
        raise Forbidden(
            "jobs over HTTP are disabled: the server has no data roots. Start it with "
            "serve.data_roots='[/dir/with/data]' to allow jobs that read below those directories"
        )
    path = str(path)
    _plain_path(key, path, pkg=True)

    def confine(candidates: Iterable[str]) -> None:
        for c in candidates:
            if not _inside(_real(c), roots):
                raise Forbidden(
                    f"{key}: {path!r} resolves outside the server's data roots ({', '.join(map(str, roots))})"
                )

    if path.startswith("pkg://") and not path[len("pkg://") :].partition("/")[0].isidentifier():
        # find_spec("a.b") imports package a (runs its __init__); a top-level name imports nothing.
        raise Forbidden(f"{key}: {path!r}: a pkg:// path names a top-level package (pkg://<package>/<path>)")
    try:
        local = resolve_path(path)
    except DataError as e:
        raise BadRequest(f"{key}: {e}") from e
    if glob.has_magic(local):
        # From the glob's fixed leading part, so "../*" cannot escape with no matches.
        confine([local.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0] or "."])
        confine(glob.glob(local, recursive=True))
    else:
        confine([local])
        if os.path.isdir(local):  # a link below (file or directory) is refused: readers may follow it
            for dirpath, dirs, files in os.walk(local):
                confine(os.path.join(dirpath, n) for n in (*dirs, *files))
    if data is not None:
        from sage_vllm_batch.sources import source_files

        try:
            confine(source_files(data)[2])
        except DataError:  # nothing to open: the job fails on its own, later
            pass


def check_output_dir(path: str, output_root: str, key: str = "output.dir") -> Path:
    """``path``, symlinks followed, strictly below ``output_root`` (the root itself is the
    server's: job dirs and records live there)."""
    path = str(path)
    _plain_path(key, path, pkg=False)
    root = _real(output_root)
    real = _real(path)
    if real == root:
        raise Forbidden(f"{key}: {path!r} is the server's output root; give a directory below it")
    if not real.is_relative_to(root):
        raise Forbidden(f"{key}: {path!r} resolves outside the server's output root {root}")
    return real


def schema_file(cfg: Any) -> str | None:
    """The path ``sampling.structured_outputs.json`` names, if it is a path (not inline JSON text
    or a mapping): what :func:`~sage_vllm_batch.config.structured.resolve_config` would read."""
    so = cfg.sampling.get("structured_outputs") if cfg.get("sampling") is not None else None
    value = so.get("json") if so is not None else None
    if isinstance(value, str) and not value.strip().startswith("{"):
        return value.strip()
    return None


@functools.cache
def _tokenizer_arguments() -> frozenset[str]:
    """apply_chat_template's own parameters: in chat_template_kwargs they would replace the
    model's template (``chat_template``), add tools or documents, or change what is returned."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD) - {"self"}


def _check_schema_file(schema: str | None, key: str, roots: Sequence[str]) -> None:
    if schema is None:
        return
    _plain_path(key, schema, pkg=False)
    real = _real(schema)
    allowed = [_real(r) for r in roots]
    if not _inside(real, allowed):
        raise Forbidden(
            f"{key}: the schema file {schema!r} resolves outside the server's data roots "
            f"({', '.join(map(str, allowed))}); give the schema inline or put it below a data root"
        )


def check_job(cfg: Any, *, data_roots: Iterable[str], output_root: str | Path) -> Path:
    """Every file the composed job would open, confined (whatever set it: an override, a preset or
    a default), before anything reads it (validation reads the schema file). Returns the output dir,
    resolved.

    A job may not write to a database (``output.vector_store.type=pgvector`` or a
    ``output.vector_store.url``, whatever set it). Read below ``serve.data_roots``: ``data.path`` (and every file its reader opens), the schema file
    of ``sampling.structured_outputs.json`` (and of each pipeline stage's). Written below ``serve.output_root``: ``output.dir``, the
    vector store (``output.vector_store.path``, default ``<output.dir>/vectors``, and its table).
    """
    roots = list(data_roots)
    check_data_path(str(cfg.data.path), roots, data=cfg.data)
    loader = cfg.data.get("hf_loader")
    if loader is not None and loader not in HF_LOADERS:
        raise Forbidden(
            f"data.hf_loader: {loader!r} is not a packaged datasets builder; a job may use {', '.join(HF_LOADERS)}"
        )
    _check_schema_file(schema_file(cfg), "sampling.structured_outputs.json", roots)
    for name, stage in (cfg.get("stages") or {}).items():  # task=pipeline: each stage's own schema
        sampling = stage.get("sampling")
        _check_schema_file(
            schema_file(OmegaConf.create({"sampling": sampling})) if sampling is not None else None,
            f"stages.{name}.sampling.structured_outputs.json",
            roots,
        )
    out = check_output_dir(str(cfg.output.dir), str(output_root))
    vs = cfg.output.get("vector_store")
    if vs is not None and (vs.get("type") == "pgvector" or vs.get("url")):
        key = "output.vector_store.url" if vs.get("url") else "output.vector_store.type"
        raise Forbidden(f"{key}: {_NO_DATABASE} (output=pgvector is for batch runs)")
    if vs is not None and vs.get("type") is not None:
        from sage_vllm_batch.outputs.vector_stores import store_path

        if vs.get("path") is not None:
            _plain_path("output.vector_store.path", str(vs.path), pkg=False)
        store = store_path(out, vs)
        check_output_dir(str(store), str(output_root), key="output.vector_store.path")
        table = str(vs.get("table") or "")
        if vs.type == "lancedb":
            if not _TABLE_NAME.fullmatch(table) or ".." in table:
                raise Forbidden(
                    f"output.vector_store.table: {table!r} must be a plain name (letters, digits, _ . -)"
                )
            check_output_dir(str(store / f"{table}.lance"), str(output_root), key="output.vector_store.table")
    kwargs = cfg.task.get("chat_template_kwargs") or {}
    bad = sorted(set(kwargs) & _tokenizer_arguments()) if kwargs else []
    if bad:
        raise Forbidden(
            f"task.chat_template_kwargs: {', '.join(bad)} are the tokenizer's arguments, not template "
            "variables; a job may pass only the chat template's own variables"
        )
    return out


def api_key_ok(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())
