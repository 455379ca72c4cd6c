"""The condition language of a pipeline stage's ``when``: a small, safe subset of Python expressions.

``verdict == 'yes'``, ``label != 'no' and score > 0.5``, ``len(answer) > 20``, ``'sql' in question``,
``not flagged``, ``lower(verdict) in ('yes', 'maybe')``, ``0.2 <= score < 0.9``.

A condition is parsed once with :mod:`ast` and every node is checked against a whitelist; what is
not on it is refused when the config is checked, naming the construct: attribute access
(``x.__class__``), subscripts, calls other than the functions below, lambdas, comprehensions,
f-strings, ``:=``, arithmetic, ``if``-expressions, dict/set literals, and names that start with
``__``. So a condition written in a service job can read the row and nothing else: no file, no
module, no object's attributes, no code. The checked tree is compiled to a tree of closures, one
per node, so evaluating a row is a few Python calls, never ``eval``.

The language:

- literals: strings, numbers, ``True``/``False``/``None``, and tuples or lists of them (for ``in``);
- names: the row's columns and the outputs of earlier stages;
- ``and``, ``or``, ``not``, unary ``-``/``+`` on numbers;
- comparisons: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``, ``is``, ``is not``
  (``is`` only against ``None``), chained (``0 < score < 1``);
- functions: :data:`FUNCTIONS` (``len``, ``lower``, ``upper``, ``strip``, ``startswith``,
  ``endswith``, ``str``, ``int``, ``float``, ``abs``, and ``score(<stage>_scores, 'label')``, a
  label's probability in a classify stage's scores).

Nulls (a column an earlier stage skipped is null) do not raise: a function of ``None`` is ``None``,
an order comparison (``<`` ...) or ``in`` with ``None`` on either side is false (``not in``: true).
A row on which a condition still fails (``len(5)``, ``'a' < 1``) raises :class:`ConditionError`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sage_vllm_batch.errors import ConfigError

__all__ = ["FUNCTIONS", "MAX_LENGTH", "Condition", "ConditionError", "compile_condition"]

MAX_LENGTH = 2000  # characters of one condition
_MAX_NODES = 500

Row = Mapping[str, Any]
Fn = Callable[[Row], Any]


class ConditionError(ValueError):
    """A condition that cannot be evaluated on a row (the row's values do not fit it)."""


def _null_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return None if any(a is None for a in args) else fn(*args)

    return call


def _score(scores: Any, label: Any) -> float | None:
    """A map column's value: a dict, or the (key, value) pairs Arrow gives a map as."""
    items = scores.items() if isinstance(scores, Mapping) else scores
    try:
        return dict(items).get(str(label))
    except (TypeError, ValueError):
        raise ConditionError(
            f"score() takes a classify stage's scores, got {type(scores).__name__}"
        ) from None


# name -> (function, number of arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "len": (_null_safe(len), 1),
    "lower": (_null_safe(lambda s: str(s).lower()), 1),
    "upper": (_null_safe(lambda s: str(s).upper()), 1),
    "strip": (_null_safe(lambda s: str(s).strip()), 1),
    "startswith": (_null_safe(lambda s, p: str(s).startswith(str(p))), 2),
    "endswith": (_null_safe(lambda s, p: str(s).endswith(str(p))), 2),
    "str": (_null_safe(str), 1),
    "int": (_null_safe(int), 1),
    "float": (_null_safe(float), 1),
    "abs": (_null_safe(abs), 1),
    # A label's probability in a classify stage's scores: score(judge_scores, 'yes') > 0.3.
    "score": (_null_safe(lambda scores, label: _score(scores, label)), 2),
}

_ORDER = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_EQUAL = {ast.Eq: operator.eq, ast.NotEq: operator.ne}
_LITERALS = (str, int, float, bool, type(None))


def _in(a: Any, b: Any) -> bool:
    return False if a is None or b is None else a in b


def _not_in(a: Any, b: Any) -> bool:
    return not _in(a, b)


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        return False if a is None or b is None else op(a, b)

    return compare


_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    **_EQUAL,
    **{k: _ordered(v) for k, v in _ORDER.items()},
    ast.In: _in,
    ast.NotIn: _not_in,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


@dataclass(frozen=True)
class Condition:
    """A checked, compiled condition: ``cond(row) -> bool``; ``names`` are the columns it reads."""

    source: str
    names: frozenset[str]
    _fn: Fn = field(repr=False, compare=False)

    def __call__(self, row: Row) -> bool:
        try:
            return bool(self._fn(row))
        except ConditionError:
            raise
        except KeyError as e:
            raise ConditionError(f"{self.source!r}: the row has no column {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ConditionError(f"{self.source!r}: {e}") from None


class _Refused(Exception):
    pass


def _describe(node: ast.AST) -> str:
    names = {
        ast.Attribute: "attribute access",
        ast.Subscript: "subscripts",
        ast.Lambda: "lambda",
        ast.ListComp: "comprehensions",
        ast.SetComp: "comprehensions",
        ast.DictComp: "comprehensions",
        ast.GeneratorExp: "comprehensions",
        ast.JoinedStr: "f-strings",
        ast.FormattedValue: "f-strings",
        ast.NamedExpr: "assignment (:=)",
        ast.BinOp: "arithmetic",
        ast.IfExp: "if-expressions",
        ast.Dict: "dict literals",
        ast.Set: "set literals",
        ast.Starred: "starred expressions",
        ast.Await: "await",
        ast.Yield: "yield",
        ast.YieldFrom: "yield",
    }
    return names.get(type(node), type(node).__name__)


class _Compiler:
    def __init__(self) -> None:
        self.names: set[str] = set()

    def compile(self, node: ast.AST) -> Fn:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise _Refused(f"{_describe(node)}: not allowed in a condition")
        return method(node)

    def _Constant(self, node: ast.Constant) -> Fn:
        value = node.value
        if not isinstance(value, _LITERALS):
            raise _Refused(f"the literal {value!r} is not allowed (strings, numbers, True/False/None)")
        return lambda row: value

    def _Name(self, node: ast.Name) -> Fn:
        name = node.id
        if name.startswith("__"):
            raise _Refused(f"the name {name!r} is not allowed (names starting with __)")
        self.names.add(name)
        return lambda row: row[name]

    def _Tuple(self, node: ast.Tuple | ast.List) -> Fn:
        items = []
        for elt in node.elts:
            if not isinstance(elt, ast.Constant) or not isinstance(elt.value, _LITERALS):
                raise _Refused("a tuple or list holds literals only (strings, numbers, True/False/None)")
            items.append(elt.value)
        value = tuple(items)
        return lambda row: value

    _List = _Tuple

    def _BoolOp(self, node: ast.BoolOp) -> Fn:
        parts = [self.compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda row: all(p(row) for p in parts)
        return lambda row: any(p(row) for p in parts)

    def _UnaryOp(self, node: ast.UnaryOp) -> Fn:
        inner = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda row: not inner(row)
        if isinstance(node.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(node.op, ast.USub) else 1

            def number(row: Row) -> Any:
                v = inner(row)
                if v is None:
                    return None
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ConditionError(
                        f"unary {'-' if sign < 0 else '+'} needs a number, got {type(v).__name__}"
                    )
                return sign * v

            return number
        raise _Refused("the operator ~ is not allowed")

    def _Compare(self, node: ast.Compare) -> Fn:
        left = self.compile(node.left)
        steps = []
        prev = node.left
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.Is | ast.IsNot) and not (_is_none(right_node) or _is_none(prev)):
                raise _Refused("'is' and 'is not' compare with None only (use == for values)")
            steps.append((_COMPARE[type(op)], self.compile(right_node)))
            prev = right_node

        def compare(row: Row) -> bool:
            a = left(row)
            for op, right in steps:
                b = right(row)
                if not op(a, b):
                    return False
                a = b
            return True

        return compare

    def _Call(self, node: ast.Call) -> Fn:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            what = node.func.id if isinstance(node.func, ast.Name) else _describe(node.func)
            raise _Refused(f"calling {what!s} is not allowed; the functions are {', '.join(FUNCTIONS)}")
        name = node.func.id
        fn, arity = FUNCTIONS[name]
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise _Refused(f"{name}() takes plain arguments only")
        if len(node.args) != arity:
            raise _Refused(f"{name}() takes {arity} argument{'s' if arity > 1 else ''}, got {len(node.args)}")
        args = [self.compile(a) for a in node.args]

        def call(row: Row) -> Any:
            values = [a(row) for a in args]
            try:
                return fn(*values)
            except (TypeError, ValueError, OverflowError) as e:
                raise ConditionError(f"{name}(): {e}") from None

        return call


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def compile_condition(source: str, key: str = "when") -> Condition:
    """Parse, check and compile a condition; anything outside the language fails now, as a
    ``ConfigError`` naming ``key`` (``stages.judge.when: ...``)."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{key}: a condition must be a non-empty string, got {source!r}")
    if len(source) > MAX_LENGTH:
        raise ConfigError(f"{key}: a condition is at most {MAX_LENGTH} characters, got {len(source)}")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"{key}: {source!r} is not a valid condition: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ConfigError(f"{key}: {source!r} is not a valid condition: {e}") from None
    if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
        raise ConfigError(f"{key}: {source!r} is too complex (more than {_MAX_NODES} parts)")
    compiler = _Compiler()
    try:
        fn = compiler.compile(tree.body)
    except _Refused as e:
        raise ConfigError(f"{key}: {source!r}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{key}: {source!r} is nested too deeply") from None
    return Condition(source=source, names=frozenset(compiler.names), _fn=fn)
