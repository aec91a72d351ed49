"""Sharing rules in CEL: static checking with a deterministic cost bound, and evaluation.

Library choice: ``celpy`` (cel-python), not ``cel`` (common-expression-language).
Both parse CEL; only celpy exposes the parse tree (a lark ``Tree``), which is
what a *static* cost bound and a type check against declared variables need.
The Rust-backed ``cel`` package offers ``compile`` / ``execute`` and lists the
referenced names, but no AST, no type checker and no cost limits: bounding an
expression there would mean a wall-clock timeout, which differs between nodes
and so cannot be used inside ``apply``. celpy is pure Python, so evaluation is
reproducible bit for bit on every node (it also range-checks 64-bit ints the
way the CEL spec requires). Parsing and evaluating with one library avoids two
implementations disagreeing. Its speed (~0.5 ms per rule) is ample here: rules
run once per record registration; a checked rule's parse and program are kept
(:func:`check_rule`, :func:`evaluate`), and the parser is built on first use, not
at import (building it takes longer than importing the rest of medledger's
command line).

The accepted language is a deliberately small, typed subset of CEL:

* literals: ``int``, ``string``, ``bool``, lists of those (no floats, uints,
  bytes, maps, ``null``, message construction);
* variables (see :data:`VARIABLES`)::

      record.id, record.resource_type, record.category, record.custodian : string
      record.version, record.effective : int   (category "" and effective 0 when absent)
      patient.id : string;  patient.orgs : list<string>

* operators ``! && || ?: == != < <= > >= in + - * / % -x`` and ``[i]`` on lists,
  with CEL's typing (no implicit conversions);
* functions: ``size``, ``startsWith``, ``endsWith``, ``contains`` and the macros
  ``exists``, ``all``, ``exists_one``, ``filter``, ``map`` over lists (``matches`` is
  refused: a regex engine can backtrack exponentially).

Static bounds (all deterministic): source at most :data:`MAX_SOURCE` characters,
at most :data:`MAX_NODES` AST nodes, expression nesting at most
:data:`MAX_NESTING`, comprehensions nested at most :data:`MAX_COMPREHENSION_DEPTH`
deep, string literals at most :data:`MAX_STRING` characters and list literals at
most :data:`MAX_LIST` elements. With no recursion and no repetition operators,
evaluation cost is then bounded by ``MAX_NODES * L ** MAX_COMPREHENSION_DEPTH``
where ``L`` bounds list lengths (literals, or ``patient.orgs`` <= member orgs).
The result must be a ``bool``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from lark import Token, Tree

from medledger.errors import RuleError

__all__ = [
    "MAX_COMPREHENSION_DEPTH",
    "MAX_NODES",
    "VARIABLES",
    "CompiledRule",
    "check_rule",
    "evaluate",
]

MAX_SOURCE = 1024
MAX_NODES = 120
MAX_NESTING = 24
#: the grammar adds ~12 parse-tree levels per nesting level; this bounds recursion
MAX_TREE_DEPTH = 12 * MAX_NESTING + 40
MAX_COMPREHENSION_DEPTH = 2
MAX_STRING = 128
MAX_LIST = 32

# Types: "int" | "string" | "bool" | "list<int>" | "list<string>" | "list<bool>"
# | "list<list<...>>" (from map); maps only as the two declared variables.
VARIABLES: dict[str, dict[str, str]] = {
    "record": {
        "id": "string",
        "resource_type": "string",
        "category": "string",
        "custodian": "string",
        "version": "int",
        "effective": "int",
    },
    "patient": {"id": "string", "orgs": "list<string>"},
}

_MACROS = {"exists", "all", "exists_one", "filter", "map"}
_STRING_METHODS = {"startsWith", "endsWith", "contains"}
_env: celpy.Environment | None = None

#: Checked rules and their programs by source text (parsing and checking are pure,
#: so a cached result is exactly what checking again would give). Bounded: cleared
#: when full.
_CACHE_LIMIT = 512
_checked: dict[str, tuple[CompiledRule, Tree[Any]]] = {}
_programs: dict[str, Any] = {}


def _environment() -> celpy.Environment:
    global _env
    if _env is None:
        _env = celpy.Environment()
    return _env


@dataclass(frozen=True, slots=True)
class CompiledRule:
    source: str
    nodes: int


def _elem(t: str) -> str | None:
    return t[5:-1] if t.startswith("list<") else None


class _Checker:
    def __init__(self) -> None:
        self.nodes = 0
        self.scopes: list[dict[str, str]] = []

    def fail(self, message: str) -> RuleError:
        return RuleError(f"rule does not type-check: {message}")

    def count(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise RuleError(f"rule too large: more than {MAX_NODES} expression nodes")
        if depth > MAX_NESTING:
            raise RuleError(f"rule nests deeper than {MAX_NESTING} levels")

    # ``t`` is the lark tree; ``d`` the semantic nesting depth; ``c`` comprehension depth
    def check(self, t: Tree[Any], d: int, c: int) -> str:
        kind = t.data
        ch = t.children
        # pass-through nodes with a single child
        if kind in (
            "expr",
            "conditionalor",
            "conditionaland",
            "relation",
            "addition",
            "multiplication",
        ):
            if len(ch) == 1 or (kind != "expr" and ch[0] is None):
                return self.check(ch[-1], d, c)
            if kind == "expr":
                if len(ch) == 3 and ch[1] is None:
                    return self.check(ch[0], d, c)
                self.count(d)
                cond = self.check(ch[0], d + 1, c)
                if cond != "bool":
                    raise self.fail("condition of ?: must be bool")
                a, b = self.check(ch[1], d + 1, c), self.check(ch[2], d + 1, c)
                if a != b:
                    raise self.fail(f"branches of ?: differ ({a} vs {b})")
                return a
            if kind in ("conditionalor", "conditionaland"):
                self.count(d)
                a, b = self.check(ch[0], d + 1, c), self.check(ch[1], d + 1, c)
                if a != "bool" or b != "bool":
                    raise self.fail("&& and || need bool operands")
                return "bool"
            self.count(d)
            op_tree = ch[0]
            op = op_tree.data
            left = self.check(op_tree.children[0], d + 1, c)
            right = self.check(ch[1], d + 1, c)
            return self.binary(op, left, right, c)
        if kind == "unary":
            if len(ch) == 1:
                return self.check(ch[0], d, c)
            self.count(d)
            inner = self.check(ch[1], d + 1, c)
            if ch[0].data == "unary_not":
                if inner != "bool":
                    raise self.fail("! needs a bool")
                return "bool"
            if inner != "int":
                raise self.fail("unary - needs an int")
            return "int"
        if kind == "member":
            return self.check(ch[0], d, c)
        if kind == "primary":
            return self.check(ch[0], d, c)
        if kind == "paren_expr":
            return self.check(ch[0], d, c)
        if kind == "literal":
            self.count(d)
            token = ch[0]
            assert isinstance(token, Token)
            return self.literal(token)
        if kind == "ident":
            self.count(d)
            name = str(ch[0])
            for scope in reversed(self.scopes):
                if name in scope:
                    return scope[name]
            if name in VARIABLES:
                return "map:" + name
            raise self.fail(f"undeclared variable {name!r}")
        if kind == "member_dot":
            self.count(d)
            base = self.check(ch[0], d + 1, c)
            field = str(ch[1])
            if not base.startswith("map:"):
                raise self.fail(f"field selection .{field} on a {base}")
            fields = VARIABLES[base[4:]]
            if field not in fields:
                raise self.fail(f"{base[4:]} has no field {field!r}")
            return fields[field]
        if kind == "member_index":
            self.count(d)
            base = self.check(ch[0], d + 1, c)
            index = self.check(ch[1], d + 1, c)
            elem = _elem(base)
            if elem is None or index != "int":
                raise self.fail("indexing needs a list and an int index")
            return elem
        if kind == "list_lit":
            self.count(d)
            items = ch[0].children if ch and ch[0] is not None else []
            if len(items) > MAX_LIST:
                raise RuleError(f"rule has a list literal longer than {MAX_LIST} elements")
            types = {self.check(item, d + 1, c) for item in items}
            if not types:
                raise self.fail("empty list literals have no type")
            if len(types) != 1:
                raise self.fail("list literal mixes types")
            return f"list<{types.pop()}>"
        if kind == "ident_arg":
            self.count(d)
            name = str(ch[0])
            args = ch[1].children if len(ch) > 1 and ch[1] is not None else []
            if name != "size" or len(args) != 1:
                raise self.fail(f"unknown function {name}/{len(args)}")
            return self.size(self.check(args[0], d + 1, c))
        if kind == "member_dot_arg":
            self.count(d)
            name = str(ch[1])
            args = ch[2].children if len(ch) > 2 and ch[2] is not None else []
            if name in _MACROS:
                return self.macro(name, ch[0], args, d, c)
            base = self.check(ch[0], d + 1, c)
            if name == "size" and not args:
                return self.size(base)
            if name in _STRING_METHODS and len(args) == 1:
                if base != "string" or self.check(args[0], d + 1, c) != "string":
                    raise self.fail(f"{name} needs string receiver and argument")
                return "bool"
            raise self.fail(f"unknown method {name}/{len(args)}")
        raise self.fail(f"unsupported construct {kind}")

    def macro(self, name: str, target: Tree[Any], args: list[Any], d: int, c: int) -> str:
        if c + 1 > MAX_COMPREHENSION_DEPTH:
            raise RuleError(
                f"rule nests comprehensions deeper than {MAX_COMPREHENSION_DEPTH} levels"
            )
        base = self.check(target, d + 1, c)
        elem = _elem(base)
        if elem is None:
            raise self.fail(f"{name}() needs a list")
        if len(args) != 2:
            raise self.fail(f"{name}() takes a variable and an expression")
        var = self._bound_var(args[0])
        self.scopes.append({var: elem})
        try:
            body = self.check(args[1], d + 1, c + 1)
        finally:
            self.scopes.pop()
        if name == "map":
            if body not in ("int", "bool"):
                raise RuleError("rule map() may only produce ints or bools")
            return f"list<{body}>"
        if body != "bool":
            raise self.fail(f"{name}() needs a bool predicate")
        return base if name == "filter" else "bool"

    def _bound_var(self, t: Any) -> str:
        node = t
        while isinstance(node, Tree) and len(node.children) >= 1 and node.data != "ident":
            real = [x for x in node.children if x is not None]
            if len(real) != 1:
                break
            node = real[0]
        if isinstance(node, Tree) and node.data == "ident":
            name = str(node.children[0])
            if name in VARIABLES:
                raise self.fail(f"comprehension variable {name!r} shadows a declared variable")
            return name
        raise self.fail("comprehension variable must be a plain identifier")

    def literal(self, tok: Token) -> str:
        if tok.type == "INT_LIT":
            return "int"
        if tok.type in ("STRING_LIT", "MLSTRING_LIT"):
            if len(tok) - 2 > MAX_STRING:
                raise RuleError(f"rule has a string literal longer than {MAX_STRING} characters")
            return "string"
        if tok.type == "BOOL_LIT":
            return "bool"
        raise self.fail(f"{tok.type.lower().replace('_lit', '')} literals are not supported")

    def size(self, t: str) -> str:
        if t != "string" and _elem(t) is None:
            raise self.fail("size() needs a string or a list")
        return "int"

    def binary(self, op: str, left: str, right: str, c: int) -> str:
        if op in ("relation_eq", "relation_ne"):
            if left != right:
                raise self.fail(f"cannot compare {left} with {right}")
            return "bool"
        if op in ("relation_lt", "relation_le", "relation_gt", "relation_ge"):
            if left != right or left not in ("int", "string"):
                raise self.fail(f"cannot order {left} and {right}")
            return "bool"
        if op == "relation_in":
            if _elem(right) != left:
                raise self.fail(f"'in' needs a list<{left}>, got {right}")
            return "bool"
        if op == "addition_add":
            if left != right or not (left in ("int", "string") or _elem(left) is not None):
                raise self.fail(f"cannot add {left} and {right}")
            if left != "int" and c > 0:
                # x + x in a comprehension body doubles per chained map: exponential growth
                raise RuleError("rule concatenates strings/lists inside a comprehension")
            return left
        if op in ("addition_sub", "multiplication_mul", "multiplication_div", "multiplication_mod"):
            if left != "int" or right != "int":
                raise self.fail(f"arithmetic needs ints, got {left} and {right}")
            return "int"
        raise self.fail(f"unsupported operator {op}")  # pragma: no cover - grammar is closed


def _tree_depth(tree: Tree[Any]) -> int:
    """Depth of the raw parse tree, computed iteratively (no recursion limit involved)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, Tree):
            stack.extend((child, depth + 1) for child in node.children)
    return deepest


def check_rule(expression: Any) -> CompiledRule:
    """Parse, type-check and bound ``expression``; raise :class:`RuleError` if it fails."""
    return _check(expression)[0]


def _check(expression: Any) -> tuple[CompiledRule, Tree[Any]]:
    if isinstance(expression, str):
        known = _checked.get(expression)
        if known is not None:
            return known
    if not isinstance(expression, str) or not expression.strip():
        raise RuleError("rule expression must be a non-empty string")
    if len(expression) > MAX_SOURCE:
        raise RuleError(f"rule expression longer than {MAX_SOURCE} characters")
    try:
        tree = _environment().compile(expression)
    except RecursionError:
        raise RuleError("rule nests too deeply to parse") from None
    except Exception as exc:  # the CEL library's errors are translated, never leaked
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuleError(f"rule does not parse: {first}") from None
    if _tree_depth(tree) > MAX_TREE_DEPTH:
        raise RuleError(f"rule nests deeper than {MAX_NESTING} levels")
    checker = _Checker()
    try:
        result = checker.check(tree, 0, 0)
    except RuleError:
        raise
    except RecursionError:
        raise RuleError("rule nests too deeply") from None
    except Exception as exc:  # pragma: no cover - defensive: unexpected tree shape
        raise RuleError(f"rule could not be checked: {type(exc).__name__}") from None
    if result != "bool":
        raise RuleError(f"rule must evaluate to bool, not {result}")
    checked = (CompiledRule(source=expression, nodes=checker.nodes), tree)
    if len(_checked) >= _CACHE_LIMIT:
        _checked.clear()
    _checked[expression] = checked
    return checked


def _to_cel(value: Any) -> Any:
    return json_to_cel(value)


def evaluate(expression: str, record: Mapping[str, Any], patient: Mapping[str, Any]) -> bool:
    """Evaluate a checked rule; raise :class:`RuleError` on any runtime error.

    ``record`` and ``patient`` must carry exactly the fields of :data:`VARIABLES`.
    """
    _, tree = _check(expression)
    activation = {
        "record": _to_cel({k: record[k] for k in VARIABLES["record"]}),
        "patient": _to_cel({k: patient[k] for k in VARIABLES["patient"]}),
    }
    try:
        program = _programs.get(expression)
        if program is None:
            program = _environment().program(tree)
            if len(_programs) >= _CACHE_LIMIT:
                _programs.clear()
            _programs[expression] = program
        result = program.evaluate(activation)
    except RecursionError:
        raise RuleError("rule evaluation recursed too deeply") from None
    except Exception as exc:
        raise RuleError(f"rule evaluation failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, celpy.celtypes.BoolType):
        return bool(result)
    if isinstance(result, (celpy.evaluation.CELEvalError, BaseException)):
        raise RuleError(f"rule evaluation failed: {result}")
    raise RuleError(f"rule evaluated to {type(result).__name__}, not bool")
