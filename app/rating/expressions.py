"""Derived-field expressions: numbers, field names, + - * / and parentheses.

Parsed once by a small recursive-descent parser into a tree of tuples and evaluated with
exact Decimal arithmetic; nothing is ever handed to `eval`. A division by zero makes the
derived field absent for that measurement (evaluate returns None), never an error.
"""

from __future__ import annotations

import re
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext

MAX_LENGTH = 500
MAX_DEPTH = 30
# significant digits of every intermediate result (a quotient such as 1/3 cannot be exact)
PRECISION = 40

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(.))")

Node = tuple[str, object, object] | tuple[str, object]


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match is not None  # `(.)` matches any character
        number, name, other = match.groups()
        if number is not None:
            tokens.append(("num", number))
        elif name is not None:
            tokens.append(("name", name))
        elif other in "+-*/()":
            tokens.append(("op", other))
        else:
            raise ExpressionError(f"unexpected character {other!r} at position {match.start(3)}")
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expression(self) -> Node:
        node = self.term()
        while (token := self.peek()) is not None and token[1] in ("+", "-") and token[0] == "op":
            self.pos += 1
            node = (token[1], node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while (token := self.peek()) is not None and token[1] in ("*", "/") and token[0] == "op":
            self.pos += 1
            node = (token[1], node, self.unary())
        return node

    def unary(self) -> Node:
        token = self.peek()
        if token == ("op", "-"):
            self.pos += 1
            return self._nested(lambda: ("neg", self.unary()))
        if token == ("op", "+"):
            self.pos += 1
            return self._nested(self.unary)
        return self.atom()

    def _nested(self, parse: object) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"nested more than {MAX_DEPTH} deep")
        try:
            return parse()  # type: ignore[operator, no-any-return]
        finally:
            self.depth -= 1

    def atom(self) -> Node:
        kind, text = self.take()
        if kind == "num":
            return ("num", Decimal(text))
        if kind == "name":
            return ("field", text)
        if text == "(":
            node = self._nested(self.expression)
            if self.take() != ("op", ")"):
                raise ExpressionError("missing `)`")
            return node
        raise ExpressionError(f"unexpected {text!r}")


def parse(text: str) -> Node:
    """Parse an expression; raises ExpressionError saying what is wrong."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    parser = _Parser(_tokens(text))
    if not parser.tokens:
        raise ExpressionError("is empty")
    node = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()[1]!r}")  # type: ignore[index]
    return node


def fields(node: Node) -> set[str]:
    """The field names an expression reads."""
    if node[0] == "field":
        return {str(node[1])}
    if node[0] == "num":
        return set()
    return set().union(*(fields(child) for child in node[1:]))  # type: ignore[arg-type]


def evaluate(node: Node, values: dict[str, Decimal]) -> Decimal | None:
    """The value for one measurement; None when a field is missing or a division is by zero."""
    with localcontext() as context:
        context.prec = PRECISION
        context.traps[DivisionByZero] = True
        context.traps[InvalidOperation] = True
        try:
            return _eval(node, values)
        except (DivisionByZero, InvalidOperation, ArithmeticError, KeyError):
            return None


def _eval(node: Node, values: dict[str, Decimal]) -> Decimal:
    op = node[0]
    if op == "num":
        return node[1]  # type: ignore[return-value]
    if op == "field":
        return values[str(node[1])]
    if op == "neg":
        return -_eval(node[1], values)  # type: ignore[arg-type]
    left, right = _eval(node[1], values), _eval(node[2], values)  # type: ignore[arg-type, misc]
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise DivisionByZero
    return left / right
