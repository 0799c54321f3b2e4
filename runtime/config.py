"""Config loading: TOML (plus ``a.b=value`` overrides) into nested dataclasses, and back to TOML.

This module owns how every program turns a config file into its typed config object:

    cfg = load_config(TrainConfig, "run.toml", ["optim.lr=3e-6", "run.name=smoke"])
    (run_dir / "config.toml").write_text(dump_config(cfg))

Checks, each raising `ConfigError` with the full dotted key (``optim.lr``):

- unknown keys (with the closest known key suggested), missing required fields;
- types: ``int``, ``float`` (an int is accepted), ``str``, ``bool``, ``list[T]``,
  ``tuple[T, ...]``, ``dict[str, T]``, ``T | None``, ``Literal[...]``, nested dataclasses, ``Enum``
  (by value), ``pathlib.Path`` (from a string), ``Any`` (taken as is).

Overrides are parsed as TOML values (``3e-6``, ``true``, ``[1, 2]``, ``"quoted"``); text that is not
a TOML value is taken as a plain string, and so is the raw text when the field is a ``str`` or
``Path`` (``run.name=1e3`` gives the string ``"1e3"``).

TOML has no null, so `dump_config` leaves out fields whose value is None: loading the dump gives
them their default again (None, for the usual ``x: T | None = None``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "dump_config", "load_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, mapping or override that does not fit the config dataclass."""


@dataclasses.dataclass(frozen=True)
class _Override:
    """A value set by an ``a.b=value`` override: its TOML value and the raw text."""

    text: str
    parsed: Any
    override: str  # the whole KEY=VALUE, for error messages

    def value_for(self, tp: Any) -> Any:
        # A str/Path field takes the raw text, so that name=1e3 or commit=0123 stay strings.
        if not isinstance(self.parsed, str) and _accepts_text(tp):
            return self.text
        return self.parsed


def _accepts_text(tp: Any) -> bool:
    if tp in (str, Path):
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(arg in (str, Path) for arg in typing.get_args(tp))
    return False


def load_config(
    cls: type[T], source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()
) -> T:
    """Build `cls` (a dataclass) from a TOML file path or a mapping, then apply `overrides`."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"load_config: {cls!r} is not a dataclass type")
    origin = ""
    if isinstance(source, Mapping):
        data = _copy_tables(source)
    else:
        origin = f"{os.fspath(source)}: "
        try:
            with open(source, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"{origin}cannot read config: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}invalid TOML: {exc}") from exc
    for override in overrides:
        _apply_override(data, override)
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{origin}{exc}") from None


def _copy_tables(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # Copy nested tables so that overrides never write into the caller's mapping.
    return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in mapping.items()}


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {override!r}: expected KEY=VALUE with KEY like 'section.field'")
    parts = [part.strip() for part in parts]
    text = text.strip()
    try:
        parsed = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = text  # not a TOML value: a bare string like run.name=baseline
    table = data
    for i, part in enumerate(parts[:-1]):
        child = table.setdefault(part, {})
        if isinstance(child, _Override) and isinstance(child.parsed, dict):
            child = table[part] = _copy_tables(child.parsed)
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])!r} is a value, not a table"
            )
        table = child
    table[parts[-1]] = _Override(text, parsed, override)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _got(value: Any, override: _Override | None = None) -> str:
    if isinstance(value, _Override):
        value, override = value.parsed, value
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    source = f", from override {override.override!r}" if override else ""
    return f"{text} ({type(value).__name__}{source})"


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if isinstance(data, cls):
        return data
    if isinstance(data, _Override):
        data = data.parsed
    where = prefix or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table for {cls.__name__}, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:  # a forward reference the class's module cannot resolve
        raise ConfigError(f"{where}: cannot resolve the field types of {cls.__name__}: {exc}") from exc
    for key in data:
        if key not in fields:
            message = f"unknown config key {_join(prefix, str(key))!r}"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if close:
                message += f"; did you mean {_join(prefix, close[0])!r}?"
            else:
                message += f"; known keys here: {', '.join(sorted(fields)) or '(none)'}"
            raise ConfigError(message)
    kwargs = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {dotted!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        # The dataclass's own __post_init__ validation: keep its message, say where.
        raise ConfigError(f"{where}: {exc}") from exc


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in tp)
    if tp is Path:
        return "path (str)"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin is not None:
        inner = ", ".join("..." if arg is ... else _type_name(arg) for arg in typing.get_args(tp))
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _convert(tp: Any, value: Any, dotted: str) -> Any:
    override = value if isinstance(value, _Override) else None
    if override is not None:
        value = override.value_for(tp)

    def wrong() -> ConfigError:
        return ConfigError(f"config key {dotted!r}: expected {_type_name(tp)}, got {_got(value, override)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, dotted)
            except ConfigError:
                continue
        raise wrong()
    if origin is typing.Literal:
        # Compare types too: True == 1, but a Literal[1] field must not take `true`.
        if any(type(value) is type(arg) and value == arg for arg in args):
            return value
        raise wrong()
    if origin is list or origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise wrong()
        if origin is tuple and not (len(args) == 2 and args[1] is ...):
            raise ConfigError(f"config key {dotted!r}: only tuple[T, ...] is supported, not {_type_name(tp)}")
        items = [_convert(args[0] if args else Any, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        key_type, value_type = args if args else (str, Any)
        if key_type is not str:
            raise ConfigError(f"config key {dotted!r}: only dict[str, T] is supported")
        return {str(k): _convert(value_type, v, _join(dotted, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            raise wrong() from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise wrong()
    raise ConfigError(f"config key {dotted!r}: unsupported field type {_type_name(tp)}")


# ---------------------------------------------------------------------------------------------
# A small TOML emitter for the types load_config supports.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def _items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if f.init]


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, enum.Enum):
        return _toml_value(value.value, where)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest repr that round-trips; always has '.', 'e' or is inf/nan
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, os.PathLike):
        return _toml_str(os.fspath(value))
    if _is_table(value):
        inner = [
            f"{_toml_key(k)} = {_toml_value(v, _join(where, k))}" for k, v in _items(value) if v is not None
        ]
        return "{ " + ", ".join(inner) + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        if any(item is None for item in value):
            raise ConfigError(f"dump_config: {where!r} holds None in a list; TOML has no null")
        return "[" + ", ".join(_toml_value(item, f"{where}[{i}]") for i, item in enumerate(value)) + "]"
    raise ConfigError(f"dump_config: {where!r} has a value of unsupported type {type(value).__name__}")


def _dump_table(value: Any, prefix: str, lines: list[str]) -> None:
    items = [(k, v) for k, v in _items(value) if v is not None]
    for key, item in items:
        if not _is_table(item):
            lines.append(f"{_toml_key(key)} = {_toml_value(item, _join(prefix, key))}")
    for key, item in items:
        if _is_table(item):
            path = _join(prefix, _toml_key(key))
            lines.extend(["", f"[{path}]"])
            _dump_table(item, path, lines)


def dump_config(config: Any) -> str:
    """TOML text that `load_config(type(config), ...)` reads back to an equal config."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise ConfigError(f"dump_config: expected a dataclass instance, got {type(config).__name__}")
    lines: list[str] = []
    _dump_table(config, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"
