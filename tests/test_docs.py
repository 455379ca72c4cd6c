"""The manual says what the code does: the architecture page's layer table is the import-graph
test's ``LAYERS``, the exit codes it lists are the ones the code exits with, the README stays a
short front door whose links into ``docs/`` resolve, and the config reference's generator renders
every group (an ``Enum`` key as its choices). Fast: no MkDocs build (``scripts/dev check`` runs
that, strict, in CI), nothing but ``ast`` and the schema imported."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib.util
import re
from pathlib import Path

from test_import_graph import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "sage_vllm_batch"
README_MAX_LINES = 250


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table of a page: its rows (header and separator left out), as cell texts."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                current.append(cells)  # the header, dropped below
            elif not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        else:
            current = None
    return [t[1:] for t in tables]


# --- architecture ----------------------------------------------------------------------------


def _layer_table() -> list[tuple[str, ...]]:
    text = (DOCS / "architecture.md").read_text()
    table = next(
        (t for t in _tables(text) if t and t[0][0].isdigit()), None
    )  # the one whose rows are numbered layers
    assert table is not None, (
        "docs/architecture.md has no layer table (rows: | 1 | `errors.py`, ... | role |)"
    )
    rows = []
    for cells in table:
        names = re.findall(r"`([^`]+)`", cells[1])
        rows.append(tuple(n.removesuffix(".py").rstrip("/") for n in names))
    return rows


def test_architecture_layer_table_is_the_import_graph_layers():
    table = _layer_table()
    assert len(table) == len(LAYERS), f"{len(table)} rows in docs/architecture.md, {len(LAYERS)} in LAYERS"
    for i, (documented, enforced) in enumerate(zip(table, LAYERS, strict=True), start=1):
        assert set(documented) == set(enforced), f"layer {i}: docs say {documented}, LAYERS says {enforced}"


# --- README ----------------------------------------------------------------------------------


def test_readme_is_a_short_front_door_whose_doc_links_resolve():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move text to docs/"
    )
    targets = re.findall(r"\]\((docs/[^)#\s]*)(?:#[^)]*)?\)", readme)
    assert targets, "the README links into docs/"
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert missing == [], f"README links to missing files: {missing}"
    assert "./scripts/dev run" in readme and "./scripts/dev test" in readme


# --- exit codes ------------------------------------------------------------------------------

# Calls that end the process with their first argument as the status.
_EXIT_CALLS = {"exit", "_exit", "Exit", "SystemExit"}


def _int(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def exit_codes_in_code(package: Path = PACKAGE) -> set[int]:
    """Every exit status the package names, read from its source with ``ast``:

    - integer literals passed to ``sys.exit``, ``os._exit``, ``typer.Exit``, ``SystemExit``;
    - ``exit_code = N`` (the CLI's status of an error class);
    - members of an ``IntEnum`` whose class name holds "Exit" (``OK = 0`` or ``OK = 0, "meaning"``),
      and module constants named ``EXIT_*``: where the codes are defined once.
    A status computed at run time (``sys.exit(job.plan(cfg))``: 0 or 1) is not seen here; 0 is
    always a code of ours.
    """
    found = {0}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in _EXIT_CALLS and (code := _int(node.args[0])) is not None:
                    found.add(code)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                code = _int(node.value)
                if code is not None and any(n == "exit_code" or n.startswith("EXIT_") for n in names):
                    found.add(code)
            elif isinstance(node, ast.ClassDef) and "exit" in node.name.lower():
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
                if bases & {"IntEnum", "Enum"}:
                    for stmt in node.body:
                        if not isinstance(stmt, ast.Assign):
                            continue
                        value = stmt.value  # a member may be (code, meaning)
                        if isinstance(value, ast.Tuple) and value.elts:
                            value = value.elts[0]
                        if (code := _int(value)) is not None:
                            found.add(code)
    return found


def exit_codes_in_docs() -> set[int]:
    """The first column of every table on docs/exit-codes.md."""
    text = (DOCS / "exit-codes.md").read_text()
    return {int(row[0]) for table in _tables(text) for row in table if row and row[0].isdigit()}


def test_exit_codes_page_lists_exactly_the_codes_in_code():
    in_code, in_docs = exit_codes_in_code(), exit_codes_in_docs()
    assert {0, 1, 2, 3} <= in_code, f"the scan of the package lost codes it used to find: {sorted(in_code)}"
    assert in_docs - in_code == set(), (
        f"docs/exit-codes.md lists codes the code never exits with: {sorted(in_docs - in_code)}"
    )
    assert in_code - in_docs == set(), (
        f"exit codes missing from docs/exit-codes.md: {sorted(in_code - in_docs)}"
    )


# --- config reference ------------------------------------------------------------------------


def _reference_hook():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_renders_every_key_of_every_group():
    hook = _reference_hook()
    from sage_vllm_batch.config import schema

    page = hook.render_reference()
    for prefix, cls, _ in hook.groups():
        for f in dataclasses.fields(cls):
            if not f.name.startswith("_"):
                key = f"{prefix}.{f.name}" if prefix else f.name
                assert f"| `{key}` |" in page, f"{key} missing from the config reference"
    for cls in (schema.ModelConfig, schema.EngineConfig, schema.SamplingConfig, schema.DataConfig):
        assert any(c is cls for _, c, _ in hook.groups()), cls.__name__
    assert "<!-- config-reference" in (DOCS / "config-reference.md").read_text()


class _Policy(enum.Enum):
    error_row = "error_row"
    truncate = "truncate"


@dataclasses.dataclass
class _WithEnum:
    """A group whose keys are Enums, as schema fields with a fixed set of strings are."""

    # what to do with a long prompt
    overlong_prompt: _Policy = _Policy.error_row
    maybe: _Policy | None = None


def test_config_reference_renders_an_enum_as_its_choices():
    table = _reference_hook()._table("task", _WithEnum)
    assert (
        "| `task.overlong_prompt` | one of `error_row`, `truncate` | `error_row` | what to do with a long prompt |"
        in table
    )
    assert "| `task.maybe` | one of `error_row`, `truncate`, or `null` | `null` |" in table
