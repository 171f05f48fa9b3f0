"""What a `.pt2` program may contain besides pickles: the strings and call targets torch turns into code.

Three parts of a serialized program become Python that runs:
- symbolic sizes (`expr_str`, e.g. "Symbol('s77', positive=True, integer=True)") are passed to
  `sympy.sympify`, which evaluates the string as Python while the archive loads;
- `guards_code` (e.g. "L['x'].size()[0] <= 64") is compiled into an assertion function when
  `ep.module()` is built and runs on every call;
- node targets are resolved by walking attributes from `torch`, `operator` or `math`, so a node
  can name any function reachable from `torch` (a C++ extension builder, a file loader).

Each is checked against what torch itself writes: expressions and guards are parsed with `ast`
(never evaluated) and every node, name, attribute and call must be in a small allowlist; node
targets must be registered operators (minus the few that read or map files) or the symbolic-int
helpers torch's serializer itself uses. Anything else raises UnsafeProgram.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

_MAX_EXPR_CHARS = 20_000  # torch writes short expressions; a huge one is not a size


class UnsafeProgram(Exception):
    """Deliberately not a RuntimeError: torch's loader catches those and retries other paths."""


# ---- symbolic size expressions (sympy) -----------------------------------------------------------

# Functions torch's shape printer emits (torch.utils._sympy.functions and sympy's own).
_SYM_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Pow", "Mul", "Add", "Mod",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "Piecewise", "ITE", "FloorDiv", "CeilDiv", "CleanDiv", "ModularIndexing", "PythonMod",
    "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "RoundToInt",
    "RoundDecimal", "PowByNatural", "FloatPow", "Identity", "LShift", "RShift", "Where",
    "IsNonOverlappingAndDenseIndicator", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor", "CeilToInt", "FloorToInt", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp",
    "OpaqueUnaryFn_log", "OpaqueUnaryFn_log2", "OpaqueUnaryFn_cos", "OpaqueUnaryFn_sin",
    "OpaqueUnaryFn_tan", "OpaqueUnaryFn_cosh", "OpaqueUnaryFn_sinh", "OpaqueUnaryFn_tanh",
    "OpaqueUnaryFn_asin", "OpaqueUnaryFn_acos", "OpaqueUnaryFn_atan",
    # relations by their class names (torch writes GreaterThan(u0, 0) for data-dependent sizes)
    "GreaterThan", "StrictGreaterThan", "LessThan", "StrictLessThan", "Equality", "Unequality",
}
_SYM_CONSTANTS = {"oo", "zoo", "nan", "pi", "E", "true", "false", "True", "False", "S"}
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}[0-9]+$")  # s0, s77, u3, zuf0, ...
_SYMBOL_KWARGS = {"positive", "integer", "real", "nonnegative", "negative", "finite", "nonzero",
                  "commutative", "even", "odd", "rational", "zero"}
_ARITH = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Add, ast.Sub,
          ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
          ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.Load,
          ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.Invert)


def _parse(text: str, what: str) -> ast.Expression:
    if len(text) > _MAX_EXPR_CHARS:
        raise UnsafeProgram(f"has an oversized {what} ({len(text)} characters)")
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise UnsafeProgram(f"has a {what} that is not an expression: {text[:80]!r}") from None


def check_sym_expr(text: str) -> None:
    """`text` is a size expression as torch writes them, or UnsafeProgram (see header)."""
    tree = _parse(text, "size expression")

    def bad(node: ast.AST) -> UnsafeProgram:
        return UnsafeProgram(f"has a size expression torch never writes: {text[:80]!r}")

    for node in ast.walk(tree):
        if isinstance(node, _ARITH):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            continue  # strings only reach Symbol('name'), checked below
        if isinstance(node, ast.Name):
            if node.id in _SYM_CALLS or node.id in _SYM_CONSTANTS or _SYMBOL_NAME.match(node.id):
                continue
            raise bad(node)
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYM_CALLS):
                raise bad(node)
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) \
                        and not (node.func.id == "Symbol" and _SYMBOL_NAME.match(a.value)):
                    raise bad(node)
            if any(kw.arg not in _SYMBOL_KWARGS or not isinstance(kw.value, ast.Constant)
                   for kw in node.keywords):
                raise bad(node)
            continue
        if isinstance(node, ast.keyword):
            continue  # checked with its call
        raise bad(node)


# ---- guards --------------------------------------------------------------------------------------

_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_MATH = {"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "isfinite", "log2", "log",
               "exp", "inf", "pi"}
_GUARD_CALLS = {"len", "int", "float", "abs", "max", "min", "IsNonOverlappingAndDenseIndicator",
                "cast_symbool_to_symint_guardless"}
_GUARD_NAMES = {"L", "math", "inf", "True", "False", "None"} | _GUARD_CALLS


def check_guard(text: str) -> None:
    """`text` is an input-shape guard as torch.export writes them, or UnsafeProgram."""
    tree = _parse(text, "guard")

    def bad() -> UnsafeProgram:
        return UnsafeProgram(f"has an input guard torch never writes: {text[:80]!r}")

    for node in ast.walk(tree):
        if isinstance(node, _ARITH + (ast.Subscript, ast.Tuple, ast.List, ast.Slice)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str, type(None))):
            continue
        if isinstance(node, ast.Name):
            if node.id in _GUARD_NAMES:
                continue
            raise bad()
        if isinstance(node, ast.Attribute):
            if node.attr in _GUARD_METHODS or (isinstance(node.value, ast.Name)
                                               and node.value.id == "math" and node.attr in _GUARD_MATH):
                continue
            raise bad()
        if isinstance(node, ast.Call):
            f = node.func
            if node.keywords or not (
                    (isinstance(f, ast.Name) and f.id in _GUARD_CALLS)
                    or (isinstance(f, ast.Attribute) and (f.attr in _GUARD_METHODS or f.attr in _GUARD_MATH))):
                raise bad()
            continue
        raise bad()


# ---- node targets --------------------------------------------------------------------------------

# Operators that read or map files named by their arguments: a model has no business calling them.
_DENIED_OPS = {"aten::from_file", "debugprims::load_tensor"}


def _allowed_plain_targets() -> set[Any]:
    import torch

    allowed = {operator.getitem, operator.eq, operator.ne, operator.le, operator.ge, operator.lt,
               operator.gt, operator.neg, operator.pos, operator.mul, operator.add, operator.sub,
               operator.floordiv, operator.mod, operator.pow, operator.truediv, operator.and_,
               operator.or_, operator.xor, operator.lshift, operator.rshift, operator.not_,
               operator.abs, operator.invert, math.trunc, math.floor, math.ceil, math.sqrt,
               torch._assert}
    for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt",
              "sym_sum", "_sym_sqrt", "_check", "_check_is_size"):
        if hasattr(torch, n):
            allowed.add(getattr(torch, n))
    return allowed


def check_program(ep: Any) -> None:
    """Every node of every graph of `ep` calls an operator, or UnsafeProgram; every guard passes
    check_guard."""
    import torch

    allowed = _allowed_plain_targets()
    for code in getattr(ep, "_guards_code", None) or ():
        if not isinstance(code, str):
            raise UnsafeProgram("has an input guard that is not text")
        check_guard(code)
    for mod in ep.graph_module.modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise UnsafeProgram(f"has a {node.op} node ({node.target}), which torch.export "
                                    "never writes")
            if node.op != "call_function":
                continue
            t = node.target
            if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                name = t._schema.name if isinstance(t, torch._ops.OpOverload) else t._qualified_op_name
                if name in _DENIED_OPS or name.startswith("debugprims::"):
                    raise UnsafeProgram(f"calls {name}, which reads files")
                continue
            if isinstance(t, torch._ops.HigherOrderOperator):
                continue
            try:
                known = t in allowed
            except TypeError:  # an unhashable target is no operator either
                known = False
            if not known:
                label = t if isinstance(t, str) else f"{getattr(t, '__module__', '?')}." \
                                                     f"{getattr(t, '__qualname__', repr(t))}"
                raise UnsafeProgram(f"calls {str(label)[:80]}, which is not an operator")
