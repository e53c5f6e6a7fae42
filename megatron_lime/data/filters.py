"""Record filters for preprocessing: `--filter "int_score >= 3" --filter "language == 'en'"`.

A filter is a small expression over a record's columns, parsed with Python's `ast` module and
then checked against a strict whitelist; it is never handed to `eval`. What is allowed:

    columns         int_score, language, language_score   (a bare name is a column)
    literals        'en', "en", 3, 0.95, -1, True, False, None
    comparisons     ==  !=  <  <=  >  >=   (chains like 0.9 <= language_score < 1 too)
    membership      dump in ['CC-MAIN-2025-05', 'CC-MAIN-2024-51'],  language not in ('de', 'fr')
    logic           and  or  not  ( )

Anything else (a call, an attribute, a subscript, arithmetic, a lambda, ...) is refused when
the flag is parsed, with the expression and the column of the offending part:

    --filter "__import__('os')": column 1: function calls are not allowed (allowed: ...)

Comparing values of different kinds (a number with a string, a null with a number) is an
error on that record, not a silent False: a typo in a filter must not quietly drop a dump.
Records are kept when every filter is true; each filter counts the records it saw and kept.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from megatron_lime.errors import LimeInputError

ALLOWED = ("column names, string/number/True/False/None literals, == != < <= > >=, in / not in [list], "
           "and, or, not, parentheses")

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda value, options: value in options, ast.NotIn: lambda value, options: value not in options,
}
_SYMBOLS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in"}
# What a refused node is called in the error message.
_REFUSED = {ast.Call: "function calls are", ast.Attribute: "attribute access is", ast.Subscript: "subscripts are",
            ast.BinOp: "arithmetic is", ast.Lambda: "lambdas are", ast.IfExp: "conditional expressions are",
            ast.NamedExpr: "assignments are", ast.Dict: "dicts are", ast.Set: "sets are",
            ast.JoinedStr: "f-strings are", ast.ListComp: "comprehensions are", ast.GeneratorExp: "comprehensions are",
            ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
            ast.Starred: "starred expressions are", ast.Await: "await is", ast.Yield: "yield is",
            ast.YieldFrom: "yield is"}

Evaluator = Callable[[Mapping[str, Any]], Any]


class FilterSyntaxError(LimeInputError):
    """A --filter expression outside the small language (the message names the expression and the position)."""


class FilterValueError(LimeInputError):
    """A record a filter cannot be evaluated on: a missing column, or values that do not compare."""


@dataclass
class RecordFilter:
    """One parsed --filter expression; call it on a record (a mapping of column name to value)."""

    expression: str
    columns: tuple[str, ...]  # every column the expression reads, in order of first use
    evaluate: Evaluator = field(repr=False)
    seen: int = 0
    kept: int = 0

    def __call__(self, record: Mapping[str, Any]) -> bool:
        try:
            return bool(self.evaluate(record))
        except FilterValueError as e:
            raise FilterValueError(f"--filter {self.expression!r}: {e}") from None


def parse_filter(expression: str) -> RecordFilter:
    """Parse and check one expression; raises FilterSyntaxError naming the expression and the column."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        lead = len(expression) - len(expression.lstrip())
        where = f"column {e.offset + lead}" if e.offset else "at the end"  # offset 0: the input ended too soon
        raise FilterSyntaxError(f"--filter {expression!r}: {where}: not a valid expression ({e.msg})") from None
    columns: list[str] = []
    evaluate = _compile(tree.body, expression, columns)
    return RecordFilter(expression, tuple(columns), evaluate)


def _refuse(node: ast.AST, expression: str, what: str) -> FilterSyntaxError:
    # ast columns are 0-based and count the stripped text; report 1-based columns of what the user wrote.
    lead = len(expression) - len(expression.lstrip())
    return FilterSyntaxError(f"--filter {expression!r}: column {node.col_offset + lead + 1}: {what} "
                             f"(allowed: {ALLOWED})")


def _compile(node: ast.AST, expression: str, columns: list[str]) -> Evaluator:
    """Turn a whitelisted node into a closure over a record; refuse every other node."""
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, expression, columns) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda record: all(p(record) for p in parts)
        return lambda record: any(p(record) for p in parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand, expression, columns)
        return lambda record: not inner(record)
    if isinstance(node, ast.Compare):
        return _compile_compare(node, expression, columns)
    if isinstance(node, ast.Name):
        name = node.id
        if name not in columns:
            columns.append(name)

        def column(record: Mapping[str, Any]) -> Any:
            try:
                return record[name]
            except KeyError:
                raise FilterValueError(f"no column {name!r} in this record "
                                       f"(columns: {', '.join(list(record)[:12])})") from None
        return column
    if _is_literal(node):
        value = _literal(node)
        return lambda record: value
    if isinstance(node, (ast.List, ast.Tuple)):
        raise _refuse(node, expression, "a list is only allowed after 'in' / 'not in'")
    if isinstance(node, ast.UnaryOp):
        raise _refuse(node, expression, "arithmetic is not allowed")
    what = _REFUSED.get(type(node), f"{type(node).__name__} expressions are")
    raise _refuse(node, expression, f"{what} not allowed")


def _compile_compare(node: ast.Compare, expression: str, columns: list[str]) -> Evaluator:
    left = _compile(node.left, expression, columns)
    steps: list[tuple[str, Callable[[Any, Any], bool], Evaluator]] = []
    for op, right in zip(node.ops, node.comparators):
        if type(op) not in _COMPARE:  # `is`, `is not`
            raise _refuse(node, expression, f"the operator {type(op).__name__!r} is not allowed")
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple)):
                raise _refuse(right, expression,
                              f"'{_SYMBOLS[type(op)]}' needs a list literal, e.g. language in ['en', 'de']")
            options = []
            for item in right.elts:
                if not _is_literal(item):
                    raise _refuse(item, expression,
                                  "a list after 'in' may hold only string/number/True/False/None literals")
                options.append(_literal(item))
            frozen = tuple(options)
            steps.append((_SYMBOLS[type(op)], _COMPARE[type(op)], lambda record, frozen=frozen: frozen))
        else:
            steps.append((_SYMBOLS[type(op)], _COMPARE[type(op)], _compile(right, expression, columns)))

    def compare(record: Mapping[str, Any]) -> bool:
        a = left(record)
        for symbol, function, right in steps:
            b = right(record)
            if not _comparable(a, b, symbol):
                raise FilterValueError(f"cannot compare {_describe(a)} {symbol} {_describe(b)}")
            try:
                if not function(a, b):
                    return False
            except TypeError:  # e.g. null < 3
                raise FilterValueError(f"cannot compare {_describe(a)} {symbol} {_describe(b)}") from None
            a = b
        return True
    return compare


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _comparable(a: Any, b: Any, symbol: str) -> bool:
    """Values of different kinds never compare, not even with == (int_score == '3' is a typo, not False).

    null compares (==, !=, in) with anything, so `language != None` works on sparse columns.
    """
    if a is None or (b is None and symbol in ("==", "!=")):
        return True
    if symbol in ("in", "not in"):
        kinds = {_kind(option) for option in b if option is not None}
        return not kinds or _kind(a) in kinds
    return _kind(a) == _kind(b)


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, int, float, bool)) or node.value is None
    # A negative number is parsed as unary minus applied to a constant.
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float))


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    value = node.operand.value  # type: ignore[attr-defined]
    return -value if isinstance(node.op, ast.USub) else value  # type: ignore[attr-defined]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return (f"{type(value).__name__} {value!r}" if not isinstance(value, str) or len(value) < 40
            else f"str {value[:37]!r}...")


class RecordFilters:
    """The --filter list: a record is kept when every filter is true, tested in order (counts per filter)."""

    def __init__(self, expressions: Sequence[str] = ()):
        self.filters = [parse_filter(e) for e in expressions]
        self.columns = tuple(dict.fromkeys(c for f in self.filters for c in f.columns))

    def __bool__(self) -> bool:
        return bool(self.filters)

    def keep(self, record: Mapping[str, Any]) -> bool:
        """True when every filter holds; a filter after the first false one is not evaluated (nor counted).

        A record a filter cannot be evaluated on raises FilterValueError and is counted by none:
        it is a bad record, not a dropped one.
        """
        for f in self.filters:
            holds = f(record)
            f.seen += 1
            if not holds:
                return False
            f.kept += 1
        return True

    def counts(self) -> list[tuple[str, int, int]]:
        """(expression, kept, dropped) per filter."""
        return [(f.expression, f.kept, f.seen - f.kept) for f in self.filters]

    def take_counts(self) -> list[tuple[int, int]]:
        """(seen, kept) per filter since the last call, then reset: what a worker sends back per chunk."""
        counts = [(f.seen, f.kept) for f in self.filters]
        for f in self.filters:
            f.seen = f.kept = 0
        return counts

    def add_counts(self, counts: Sequence[tuple[int, int]]) -> None:
        for f, (seen, kept) in zip(self.filters, counts):
            f.seen += seen
            f.kept += kept

    def summary(self) -> str:
        """One line per filter: kept and dropped, for the preprocessing summary."""
        return "\n".join(f"  filter {expression!r}: kept {kept:,}, dropped {dropped:,}"
                         for expression, kept, dropped in self.counts())
