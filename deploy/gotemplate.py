"""A small Go text/template renderer: the subset deploy/helm/cosyvoice2/templates uses, so the chart can be
rendered and checked where Helm is not installed (deploy/render.py helm-template, deploy/tests).

Supported: text; `{{ pipeline }}`; trim markers `{{-` / `-}}`; comments `{{/* */}}`; `if` / `else if` /
`else` / `end`; `range $v := X`, `range $k, $v := X` (maps in sorted key order, as Go does), `range X`;
fields `.A.B`, `$.A`, `$v.a`; string and integer literals; pipes `x | f`; functions `eq ne gt ge lt le
and or not quote upper lower default`. Anything else is an error: a template feature we would render
wrongly must fail the tests instead of passing silently. Missing keys are errors too (Helm prints
"<no value>" or an empty string; we would rather know).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\||\(|\)|:=|,|[^\s|(),]+)')


class TemplateError(ValueError):
    pass


@dataclass
class _Node:
    kind: str                      # text | expr | if | range
    text: str = ""
    expr: list = field(default_factory=list)
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)
    vars: tuple[str, ...] = ()


def _tokenize(src: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s) pieces, applying the trim markers."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _words(action: str) -> list[str]:
    words, pos = [], 0
    while pos < len(action):
        m = _TOKEN.match(action, pos)
        if not m or not m.group(1):
            break
        words.append(m.group(1))
        pos = m.end()
    if action[pos:].strip():
        raise TemplateError(f"cannot parse action {{{{ {action} }}}}")
    return words


def _parse(pieces: list[tuple[str, str]]) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for kind, s in pieces:
        cur = stack[-1][1]
        if kind == "text":
            if s:
                cur.append(_Node("text", text=s))
            continue
        words = _words(s)
        head = words[0] if words else ""
        if head == "if":
            node = _Node("if", expr=words[1:])
            cur.append(node)
            stack.append((node, node.body))
        elif head == "range":
            rest = words[1:]
            names: tuple[str, ...] = ()
            if ":=" in rest:
                i = rest.index(":=")
                names = tuple(w for w in rest[:i] if w != ",")
                rest = rest[i + 1:]
            node = _Node("range", expr=rest, vars=names)
            cur.append(node)
            stack.append((node, node.body))
        elif head == "else":
            owner = stack[-1][0]
            if owner is None:
                raise TemplateError("{{ else }} outside if/range")
            stack.pop()
            if words[1:2] == ["if"]:
                nested = _Node("if", expr=words[2:])
                owner.orelse.append(nested)
                # the outer frame is gone; a sentinel makes the chain's single `end` close it
                stack.append((_Node("chain"), []))
                stack.append((nested, nested.body))
            else:
                stack.append((owner, owner.orelse))
        elif head == "end":
            if len(stack) == 1:
                raise TemplateError("{{ end }} without if/range")
            stack.pop()
            # an `else if` chain replaced its outer frame with sentinels: one `end` closes them all
            while len(stack) > 1 and stack[-1][0] is not None and stack[-1][0].kind == "chain":
                stack.pop()
        elif head in ("with", "define", "template", "block", "include", "tpl"):
            raise TemplateError(f"unsupported action {head!r}")
        else:
            cur.append(_Node("expr", expr=words))
    if len(stack) != 1:
        raise TemplateError("missing {{ end }}")
    return root


def _truthy(v: object) -> bool:
    return v not in (None, False, 0, "", [], {}) and not (isinstance(v, (list, dict, str)) and len(v) == 0)


def _quote(v: object) -> str:
    s = "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "not": lambda a: not _truthy(a),
    "quote": _quote, "upper": lambda s: str(s).upper(), "lower": lambda s: str(s).lower(),
    "default": lambda d, v=None: v if _truthy(v) else d,
}


class _Scope:
    def __init__(self, root: dict):
        self.root = root
        self.dot: object = root
        self.vars: dict[str, object] = {"$": root}


def _lookup(obj: object, path: list[str], where: str) -> object:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            raise TemplateError(f"{where}: no key {key!r}")
        obj = obj[key]
    return obj


def _value(word: str, scope: _Scope) -> object:
    if word.startswith('"'):
        return bytes(word[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false"):
        return word == "true"
    if word == ".":
        return scope.dot
    if word.startswith("."):
        return _lookup(scope.dot, word[1:].split("."), word)
    if word.startswith("$"):
        name, _, rest = word.partition(".")
        if name not in scope.vars:
            raise TemplateError(f"undefined variable {name}")
        return _lookup(scope.vars[name], rest.split(".") if rest else [], word)
    raise TemplateError(f"unknown word {word!r}")


def _eval(words: list[str], scope: _Scope) -> object:
    # split on top-level pipes; parentheses group a sub-pipeline
    commands: list[list[str]] = [[]]
    depth = 0
    for w in words:
        if w == "(":
            depth += 1
        elif w == ")":
            depth -= 1
        if w == "|" and depth == 0:
            commands.append([])
        else:
            commands[-1].append(w)
    result: object = _NOTHING
    for cmd in commands:
        args = _args(cmd, scope)
        if cmd and cmd[0] in _FUNCS:
            fn_args = args[1:] + ([] if result is _NOTHING else [result])
            result = _FUNCS[cmd[0]](*fn_args)
        else:
            if len(args) != 1 or result is not _NOTHING:
                raise TemplateError(f"cannot evaluate {' '.join(cmd)!r}")
            result = args[0]
    return result


_NOTHING = object()


def _args(cmd: list[str], scope: _Scope) -> list[object]:
    out: list[object] = []
    i = 0
    while i < len(cmd):
        w = cmd[i]
        if w == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(cmd[j], 0)
                j += 1
            out.append(_eval(cmd[i + 1:j - 1], scope))
            i = j
            continue
        out.append(w if (i == 0 and w in _FUNCS) else _value(w, scope))
        i += 1
    return out


def _render(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "expr":
            v = _eval(n.expr, scope)
            out.append("" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)))
        elif n.kind == "if":
            _render(n.body if _truthy(_eval(n.expr, scope)) else n.orelse, scope, out)
        elif n.kind == "range":
            coll = _eval(n.expr, scope)
            items = sorted(coll.items()) if isinstance(coll, dict) else list(enumerate(coll or []))
            if not items:
                _render(n.orelse, scope, out)
            saved_dot, saved_vars = scope.dot, dict(scope.vars)
            for k, v in items:
                scope.dot = v
                if len(n.vars) == 1:
                    scope.vars[n.vars[0]] = v
                elif len(n.vars) == 2:
                    scope.vars[n.vars[0]], scope.vars[n.vars[1]] = k, v
                _render(n.body, scope, out)
            scope.dot, scope.vars = saved_dot, saved_vars


def render(template: str, context: dict) -> str:
    out: list[str] = []
    _render(_parse(_tokenize(template)), _Scope(context), out)
    return "".join(out)
