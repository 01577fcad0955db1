"""Dataclasses as the schema of YAML data: building them from nested dicts with type checks, and the
value checks their ``__post_init__`` methods run. Every message names the key and what to fix."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def check_choice(name: str, value: object, choices: typing.Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_number(name: str, value: float, low: float = 0.0, strict: bool = False, high: float | None = None) -> None:
    """A finite number >= low (> low when ``strict``) and, when given, <= high; the message names the key."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}" + (f" and <= {high:g}" if high else "")
                         + f"; fix {name} in the recipe or its override")


def check_int(name: str, value: int, low: int = 1, note: str = "") -> None:
    """An integer >= ``low`` (1: positive, 0: non-negative); ``note`` is added to the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be a {'positive' if low > 0 else 'non-negative'} integer{note}")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Check (and lightly coerce: int -> float) a YAML value against a dataclass field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        errors = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{path}={value!r} must be a list")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise TypeError(f"{path}={value!r} must be of type {annotation.__name__}")
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts; unknown keys and wrong types raise naming the key."""
    if not isinstance(data, dict):
        raise TypeError(f"{path or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {path}" if path else ""
        raise ValueError(f"unknown key {unknown[0]!r}{where}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key)
        else:
            kwargs[name] = _check_type(key, value, hint)
    return cls(**kwargs)
