"""Typed configuration from the environment: declared once as dataclass fields, read once, validated at start.

A process declares its knobs as fields of a frozen dataclass, each made by `knob(...)` (environment variable,
default, meaning, allowed values), and reads them with `from_env(Config, os.environ)` in its `main`. The same
declarations generate docs/CONFIGURATION.md (`python -m cosyvoice_tools.config_docs`), so the table cannot
drift from the code. Library code never reads the environment: it receives the config object.

    @dataclass(frozen=True)
    class Example:
        port: int = knob("PORT", 8080, "where it listens", low=0, high=65535)
    from_env(Example, {"PORT": "70000"})   # ConfigError: PORT='70000': must be <= 65535

An empty value means the default (compose and the Makefile pass unset variables as empty strings).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A variable holds a value its knob does not allow; the message names the variable and what it allows."""


@dataclass(frozen=True, slots=True)
class Knob:
    """What `knob()` stores in a field's metadata."""
    env: str                                  # variable name, without the reader's prefix (e.g. "URLS")
    help: str
    choices: tuple[str, ...] = ()             # allowed values (strings as written in the environment)
    low: float | None = None
    high: float | None = None
    secret: bool = False                      # never shown (API keys)
    required: bool = False                    # no default: unset or empty is an error


def knob(env: str, default: Any, help: str, *, choices: Sequence[str] = (), low: float | None = None,
         high: float | None = None, secret: bool = False, required: bool = False) -> Any:
    """A dataclass field read from `env` (prefixed by the reader's prefix, if any). `required`: the field
    still needs a placeholder default (dataclass field order) but from_env refuses an unset variable."""
    meta = {"knob": Knob(env, help, tuple(choices), low, high, secret, required)}
    if isinstance(default, (list, dict, set)):
        raise TypeError("knob defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class KnobDoc:
    """One row of the configuration table."""
    variable: str
    type: str
    default: str
    help: str
    choices: tuple[str, ...]


def parse_flag(text: str, name: str) -> bool:
    """A boolean as the environment or a config.pbtxt parameter writes it."""
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{name}={text!r}: expected one of {', '.join(_TRUE + _FALSE)}")
    return value in _TRUE


def _knob(f: dataclasses.Field) -> Knob | None:
    return f.metadata.get("knob")


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "bool"
    if tp in (int, float, str):
        return tp.__name__
    if tp is Path:
        return "path"
    if typing.get_origin(tp) is tuple:
        return "list"
    return str(tp)


def _parse(raw: str, tp: Any, name: str, k: Knob) -> Any:
    text = raw.strip()
    try:
        if tp is bool:
            return parse_flag(text, name)
        if tp is int:
            value: Any = int(text)
        elif tp is float:
            value = float(text)
        elif tp is Path:
            value = Path(text)
        elif typing.get_origin(tp) is tuple:
            value = tuple(part.strip() for part in text.split(",") if part.strip())
        else:
            value = text
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {'an integer' if tp is int else 'a number'}") from None
    _check(value, name, k, raw)
    return value


def _check(value: Any, name: str, k: Knob, raw: object) -> None:
    shown = "(hidden)" if k.secret else repr(raw)
    if k.choices and str(value) not in k.choices:
        raise ConfigError(f"{name}={shown}: expected one of {', '.join(c or '(empty)' for c in k.choices)}")
    if k.low is not None and value < k.low:
        raise ConfigError(f"{name}={shown}: must be >= {k.low:g}")
    if k.high is not None and value > k.high:
        raise ConfigError(f"{name}={shown}: must be <= {k.high:g}")


def knob_fields(cls: type) -> list[tuple[dataclasses.Field, Knob, Any]]:
    """(field, knob, resolved type) of every knob of `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, k, hints[f.name]) for f in dataclasses.fields(cls) if (k := _knob(f)) is not None]


def from_env(cls: type[T], env: Mapping[str, str], prefix: str = "", **given: Any) -> T:
    """`cls` with each knob read from `env[prefix + knob.env]` (unset or empty = the default), plus `given`
    (fields that are not knobs, or values a caller computed). Raises ConfigError naming the variable."""
    values: dict[str, Any] = {}
    for f, k, tp in knob_fields(cls):
        if f.name in given:
            continue
        name = prefix + k.env
        raw = env.get(name)
        if raw is not None and raw.strip():
            values[f.name] = _parse(raw, tp, name, k)
        elif k.required:
            raise ConfigError(f"{name} is not set; it is required ({k.help})")
        elif f.default is not MISSING:
            _check(f.default, name, k, f.default)
    return _build(cls, values, given)


def from_template_values(cls: type[T], values: Mapping[str, str | None], **given: Any) -> T:
    """`cls` read back from what `template_values` wrote, keyed by field name (a stage's config.pbtxt
    parameters): every knob must be there and filled, parsed and checked as `from_env` does. Raises ConfigError
    naming the parameter."""
    parsed: dict[str, Any] = {}
    for f, k, tp in knob_fields(cls):
        if f.name in given:
            continue
        raw = values.get(f.name)
        if raw is None or raw.startswith("${"):
            raise ConfigError(f"config.pbtxt parameter {f.name!r} is not set (got {raw!r})")
        parsed[f.name] = _parse(raw, tp, f.name, k)
    return _build(cls, parsed, given)


def _build(cls: type[T], values: dict[str, Any], given: Mapping[str, Any]) -> T:
    try:
        return cls(**values, **given)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:   # a cross-field rule in __post_init__
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def check_knobs(config: object) -> None:
    """Each knob's bounds and choices on a config built directly (tests, callers); from_env checks them too,
    naming the prefixed variable. Call from __post_init__."""
    for f, k, _ in knob_fields(type(config)):
        value = getattr(config, f.name)
        if not (k.required and value in ("", None)):
            _check(value, k.env, k, value)


def variables(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every variable `from_env(cls, env, prefix)` reads."""
    return tuple(prefix + k.env for _, k, _ in knob_fields(cls))


def document(cls: type, prefix: str = "") -> list[KnobDoc]:
    """The table rows of `cls` (see cosyvoice_tools.config_docs)."""
    rows = []
    for f, k, tp in knob_fields(cls):
        default = f.default
        if k.required:
            shown = "(required)"
        elif k.secret or default in ("", ()):
            shown = "(empty)" if default in ("", ()) else "(hidden)"
        elif isinstance(default, bool):
            shown = "1" if default else "0"
        elif isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = str(default)
        rows.append(KnobDoc(prefix + k.env, _type_name(tp), shown, k.help, k.choices))
    return rows


def template_values(config: object) -> dict[str, str]:
    """config.pbtxt `${field}` values of a settings object (bools as 1/0, as model configs read them); the
    stage reads them back with `from_template_values`."""
    out = {}
    for f, _, _ in knob_fields(type(config)):
        value = getattr(config, f.name)
        out[f.name] = ("1" if value else "0") if isinstance(value, bool) else ",".join(value) if isinstance(
            value, tuple) else str(value)
    return out
