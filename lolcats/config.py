"""Configuration dataclasses: the schema. YAML is data; unknown keys are errors listing valid ones."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lolcats.feature_maps import FEATURE_MAPS, INITS
from lolcats.ops.masks import VARIANTS


def _choice(name: str, value: object, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclass
class AttentionConfig:
    """How each softmax attention layer is replaced (DESIGN.md §1).

    Attributes:
        variant: ``terraced`` (the original's released default), ``sliding_window`` or ``linear``.
        window_size: w, keys scored by exact softmax (64 in the paper).
        feature_map: name in :data:`lolcats.feature_maps.FEATURE_MAPS`.
        feature_dim: f, width of each Hedgehog half (φ has 2f entries).
        feature_init: ``kaiming`` (the original's released configs) or ``identity``.
        window_factor_init: ω₀, the window factor is γ = sigmoid(ω); −2.197 gives γ ≈ 0.1.
        chunk_size: query chunk of the O(T) form.
        skip_layers: decoder-layer indices kept as softmax attention (hybrid models).
        keep_native_window: keep layers the model already runs with a sliding window as they are.
    """

    variant: str = "terraced"
    window_size: int = 64
    feature_map: str = "hedgehog"
    feature_dim: int = 64
    feature_init: str = "kaiming"
    window_factor_init: float = -2.197
    chunk_size: int = 64
    skip_layers: list[int] = field(default_factory=list)
    keep_native_window: bool = False

    def __post_init__(self) -> None:
        _choice("attention.variant", self.variant, VARIANTS)
        _choice("attention.feature_map", self.feature_map, sorted(FEATURE_MAPS))
        _choice("attention.feature_init", self.feature_init, INITS)
        _positive("attention.window_size", self.window_size)
        _positive("attention.feature_dim", self.feature_dim)
        _positive("attention.chunk_size", self.chunk_size)
        if not math.isfinite(float(self.window_factor_init)):
            raise ValueError(f"attention.window_factor_init={self.window_factor_init!r} must be finite")
        for i in self.skip_layers:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"attention.skip_layers contains {i!r}; give non-negative layer indices")


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
