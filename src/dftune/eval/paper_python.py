"""A Python-syntax answer ("1,2", "{1,2}", "x**2", "sqrt(2)/2") as sympy, without executing it.

The paper's harness falls back on sympy's ``parse_expr`` (and ``N``/``equals`` call
``sympify``) when an answer is not LaTeX it can read; both evaluate the text as Python,
with every builtin in reach. Here the text is parsed with ``ast`` (which only parses) and
built from a whitelist: numbers (integers as sympy Integers, decimals as Floats from
their digits, ``2j`` as ``2*I``), names (sympy's constants and mathematical functions,
``max``/``min`` as ``Max``/``Min``, ``abs``/``pow``/``round``; any other name is a
symbol, or an undefined function when called, as ``parse_expr`` makes them), the
arithmetic operators, one comparison, and tuples, lists and sets. Anything else (strings,
attributes, subscripts, lambdas, calls of other callables) is refused with ``ValueError``,
and the caller moves on as if ``parse_expr`` had failed.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import operator
import types
from functools import lru_cache

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_CONSTRUCTORS = ("sqrt", "root", "cbrt", "Rational", "Integer", "Matrix", "Interval", "FiniteSet", "Tuple",
                 "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Max", "Min", "binomial", "factorial")


@lru_cache(maxsize=1)
def _names():
    """(values, callables, taken): the names ``parse_expr`` would resolve to sympy objects
    we accept; the callables we accept; every name it would NOT turn into a symbol."""
    import sympy
    from sympy.core.function import FunctionClass

    space = {k: getattr(sympy, k) for k in sympy.__all__}  # what "from sympy import *" brings
    taken = {k for k, v in space.items() if isinstance(v, (sympy.Basic, type)) or callable(v)
             or type(v).__name__ == "AssumptionKeys"}
    taken |= {k for k, v in vars(builtins).items() if isinstance(v, types.BuiltinFunctionType)}
    values = {k: v for k, v in space.items() if isinstance(v, sympy.Basic) and not callable(v)}
    calls = {k: v for k, v in space.items() if isinstance(v, FunctionClass)}
    calls.update({k: space[k] for k in _CONSTRUCTORS if k in space})
    calls.update({"max": sympy.Max, "min": sympy.Min, "abs": abs, "pow": pow, "round": round})
    return values, calls, taken


class _Builder(ast.NodeVisitor):
    def __init__(self, source: str):
        self.source = source

    def generic_visit(self, node):
        raise ValueError(f"not accepted: {type(node).__name__}")

    def visit_Expression(self, node):
        return self.visit(node.body)

    def visit_Constant(self, node):
        import sympy

        value = node.value
        if isinstance(value, bool) or value is None:
            return value
        text = (ast.get_source_segment(self.source, node) or repr(value)).strip()
        if isinstance(value, complex):
            return self._number(text[:-1]) * sympy.I
        if isinstance(value, (int, float)):
            return self._number(text)
        raise ValueError("not accepted: a string")

    @staticmethod
    def _number(text: str):
        import sympy

        if "." in text or (("e" in text or "E" in text) and not text.lower().startswith("0x")):
            return sympy.Float(text)
        return sympy.Integer(int(text, 0))

    def visit_Name(self, node):
        import sympy

        values, _, taken = _names()
        if node.id in values:
            return values[node.id]
        if node.id in taken or keyword.iskeyword(node.id):
            raise ValueError(f"not accepted: the name {node.id}")
        return sympy.Symbol(node.id)

    def visit_Call(self, node):
        import sympy

        if not isinstance(node.func, ast.Name) or node.keywords:
            raise ValueError("not accepted: this call")
        _, calls, taken = _names()
        args = [self.visit(a) for a in node.args]
        name = node.func.id
        if name in calls:
            return calls[name](*args)
        if name in taken:
            raise ValueError(f"not accepted: a call of {name}")
        return sympy.Function(name)(*args)

    def visit_BinOp(self, node):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ValueError(f"not accepted: {type(node.op).__name__}")
        return op(self.visit(node.left), self.visit(node.right))

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub):
            return -self.visit(node.operand)
        if isinstance(node.op, ast.UAdd):
            return +self.visit(node.operand)
        raise ValueError(f"not accepted: {type(node.op).__name__}")

    def visit_Compare(self, node):
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
            raise ValueError("not accepted: this comparison")
        return _COMPARE[type(node.ops[0])](self.visit(node.left), self.visit(node.comparators[0]))

    def visit_Tuple(self, node):
        return tuple(self.visit(e) for e in node.elts)

    def visit_List(self, node):
        return [self.visit(e) for e in node.elts]

    def visit_Set(self, node):
        return {self.visit(e) for e in node.elts}

    def visit_Dict(self, node):
        if node.keys:
            raise ValueError("not accepted: a dict")
        return {}


def parse_python(text: str, xor_is_power: bool = False):
    """``text`` read as a Python expression of sympy objects (see the module docstring);
    xor_is_power: read ``^`` as ``**``, as ``sympify`` does. Raises ValueError (or
    SyntaxError) for anything it does not accept."""
    if xor_is_power:
        text = text.replace("^", "**")
    tree = ast.parse(text.strip(), mode="eval")
    return _Builder(text.strip()).visit(tree)
