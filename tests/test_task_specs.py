"""Task specs (sage_vllm_batch.tasks): one spec per task holds its decisions, and the rest of the
package asks the spec instead of comparing task names. Read from source with ``ast`` (like
test_import_graph.py): nothing is imported for the count, and the test runs in milliseconds."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_import_graph import PACKAGES, ROOT, discover_modules

from sage_vllm_batch import tasks
from sage_vllm_batch.config.choices import TaskName
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.shards import output_schema
from sage_vllm_batch.requests.prompts import HOOKS, prompt_hook

TASK_NAMES = frozenset({"embed", "chat", "generate"})
# Modules of the package that may still compare a value against a task name.
MAX_MODULES = 4
_COMPARING = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def _strings(node: ast.AST) -> set[str]:
    """The string constants an operand is made of (a literal, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_strings(e) for e in node.elts))
    return set()


def task_name_comparisons(root: Path, packages=PACKAGES) -> dict[str, list[str]]:
    """Module -> ``path:line source`` of each comparison (``==``, ``!=``, ``in``, ``not in``,
    ``is``, ``is not``, a ``match`` case) against ``"embed"``, ``"chat"`` or ``"generate"``."""
    found: dict[str, list[str]] = {}
    for module, path in discover_modules(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Compare) and any(isinstance(op, _COMPARING) for op in node.ops):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                operands = [node.value]
            else:
                continue
            if set().union(*(_strings(o) for o in operands)) & TASK_NAMES:
                where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                found.setdefault(module, []).append(f"{where} {ast.unparse(node)}")
    return found


def test_task_names_are_compared_in_at_most_four_modules():
    found = task_name_comparisons(ROOT)
    if len(found) > MAX_MODULES:
        lines = "\n".join(f"{m}:\n    " + "\n    ".join(sites) for m, sites in sorted(found.items()))
        pytest.fail(
            f"{len(found)} modules compare values against task names (at most {MAX_MODULES}); ask the "
            f"task's spec instead (sage_vllm_batch.tasks):\n{lines}",
            pytrace=False,
        )


def test_the_count_finds_every_form_of_comparison(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f(t):\n    return t == 'embed'\n",
        "pkg/b.py": "def f(t):\n    return t.type not in ('chat', 'x')\n",
        "pkg/c.py": "def f(t):\n    match t:\n        case 'generate':\n            return 1\n",
        "pkg/d.py": "X = {'embed': 1}\n\ndef f(t):\n    return g('chat') or t == 'finetune'\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = task_name_comparisons(tmp_path, ("pkg",))
    assert sorted(found) == ["pkg.a", "pkg.b", "pkg.c"]  # a mapping or an argument is no comparison
    assert found["pkg.b"] == ["pkg/b.py:2 t.type not in ('chat', 'x')"]


# -------------------------------------------------------------------------- the registry
def test_every_task_has_one_spec_and_the_schema_takes_exactly_those():
    assert (
        [t.value for t in TaskName]
        == list(tasks.SPECS)
        == ["embed", "generate", "chat", "classify", "finetune"]
    )
    for name, spec in tasks.SPECS.items():
        assert spec.name == name and tasks.task_spec(name) is spec and tasks.task_spec(spec) is spec
        assert tasks.task_spec(TaskName[name]) is spec  # the enum value a composed job holds
    with pytest.raises(
        ConfigError, match=r"task\.type: must be one of embed, generate, chat, classify, finetune, got 'x'"
    ):
        tasks.task_spec("x")


@pytest.mark.parametrize("spec", list(tasks.SPECS.values()), ids=list(tasks.SPECS))
def test_a_spec_is_consistent(spec):
    if spec.runner is None:  # finetune: no engine over rows, no requests, no output rows
        assert spec.endpoint is None and spec.output is None and not spec.generates
        with pytest.raises(ConfigError, match="no rows into engine requests"):
            prompt_hook(spec)
        return
    hook = prompt_hook(spec)
    assert inspect.isgeneratorfunction(hook)  # may yield several requests of one row
    assert spec.generates == (spec.runner == tasks.Runner.generate)
    # A generating task needs a text model; a pooling one an embedding model.
    assert (spec.model_type == tasks.ModelType.text) == spec.generates
    assert spec.vectors == (not spec.generates) == (spec.normalize is not None)
    assert spec.input_columns and all(k.endswith("_column") for k in spec.input_columns)
    names = output_schema(spec, [], embedding_dim=4).names
    assert names[0] == "id" and names[-1] == "error" and "prompt_tokens" in names
    if spec.classifies:  # one forward pass, no text and no OpenAI route
        assert spec.endpoint is None and "label" in names and "text" not in names
        return
    ep = spec.endpoint
    assert ep.route.startswith("/v1/") and tasks.spec_for_route(ep.route) is spec
    module, _, cls = ep.request_model.partition(":")
    assert module.startswith("vllm.entrypoints.") and cls.endswith("Request")
    names = output_schema(spec, [], embedding_dim=4).names
    assert names[0] == "id" and names[-1] == "error" and "prompt_tokens" in names
    assert ("embedding" in names) == spec.vectors and ("text" in names) == spec.generates


def test_a_served_model_is_loaded_for_the_first_task_of_its_kind():
    assert tasks.spec_for_model_type("embedding") is tasks.EMBED
    assert tasks.spec_for_model_type(tasks.ModelType.text) is tasks.GENERATE  # chat shares its engine
    with pytest.raises(ConfigError, match="model.type: must be one of text, embedding, got 'vision'"):
        tasks.spec_for_model_type("vision")


def test_every_hook_belongs_to_a_spec():
    assert set(HOOKS) == {n for n, s in tasks.SPECS.items() if s.runner is not None}


def test_the_openai_routes_come_from_the_specs_in_route_order():
    from sage_vllm_batch.service.batches.protocol import ENDPOINTS as BATCH_ENDPOINTS
    from sage_vllm_batch.service.slots import EMBED, TEXT
    from sage_vllm_batch.sources.openai_batch import ENDPOINTS

    routes = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    assert list(ENDPOINTS.items()) == list(
        zip(routes, [("messages", "messages"), ("prompt", "prompt"), ("input", "text")], strict=True)
    )
    assert list(BATCH_ENDPOINTS.items()) == list(
        zip(routes, [("chat", TEXT), ("generate", TEXT), ("embed", EMBED)], strict=True)
    )


def test_the_input_column_is_the_specs():
    data = {
        "text_column": "t",
        "prompt_column": "p",
        "messages_column": "m",
        "prompt_template": None,
    }
    assert tasks.EMBED.input_names(data) == ["t"]
    assert tasks.GENERATE.input_names(data) == ["p"]
    assert tasks.CHAT.input_names(data) == ["m"] == tasks.CHAT.input_names(data, ["m", "p"])
    assert tasks.CHAT.input_names(data, ["p", "x"]) == ["p"]  # a plain prompt asked as a chat
    templated = {**data, "prompt_template": "Q: {q}"}
    assert tasks.CHAT.input_names(templated) == [] == tasks.GENERATE.input_names(templated)
    assert tasks.EMBED.input_names(templated) == []  # a template builds the text embedded, too


def test_the_commit_transform_is_one_l2_normalisation():
    v = np.array([3.0, 4.0], dtype=np.float32)
    assert tasks.EMBED.normalize is tasks.l2_normalize
    np.testing.assert_allclose(tasks.l2_normalize(v), [0.6, 0.8], rtol=1e-6)
    assert not tasks.l2_normalize(np.zeros(3, dtype=np.float32)).any()  # zero stays zero

    class Res:
        def __init__(self, vec, error=None):
            self.embedding, self.error, self.prompt_tokens = vec, error, 2

    rows = [Res(v), Res(None, error="empty input")]
    plain = tasks.EmbeddingLayout(2).columns(rows)["embedding"]
    unit = tasks.EmbeddingLayout(2, tasks.EMBED.normalize).columns(rows)["embedding"]
    assert plain.to_pylist() == [[3.0, 4.0], None]
    np.testing.assert_allclose(unit.to_pylist()[0], [0.6, 0.8], rtol=1e-6)
    assert unit.type == pa.list_(pa.float32(), 2) and unit.null_count == 1


def test_the_embedding_layout_needs_the_models_dimension():
    with pytest.raises(ValueError, match="embedding_dim is required for task=embed"):
        tasks.EMBED.layout()
    with pytest.raises(ConfigError, match="writes no output rows"):
        tasks.FINETUNE.layout()
