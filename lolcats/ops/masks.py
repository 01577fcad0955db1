"""Window shapes and padding positions, defined once for every attention form.

A window shape says which causal (query, key) pairs are scored by the exact softmax; every other causal
pair enters the linear part (paper Eq. 7). Shapes are classes registered by name (the recipe's
``attention.variant``), each knowing its look-back and the keys a decode state keeps.

Positions are *real* positions: a token's index minus the index of its row's first real
(non-padding) token. Sliding windows depend only on position differences, terraced blocks on the
positions themselves, so a left-padded row sees the same blocks as the sequence alone.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

WINDOW_SHAPES: dict[str, type[WindowShape]] = {}
VARIANTS = WINDOW_SHAPES.keys()  # the registered names, a live view: ``attention.variant`` takes one of them


def window_shape(name: str, size: int) -> WindowShape:
    """The registered shape ``name`` with a window of ``size`` tokens; ValueError naming the valid ones."""
    if name not in WINDOW_SHAPES:
        raise ValueError(f"unknown attention variant {name!r}; choose one of {', '.join(WINDOW_SHAPES)}")
    return WINDOW_SHAPES[name](size)


class WindowShape:
    """Which causal keys a query scores by exact softmax, for a window of ``size`` tokens (w).

    A subclass registers itself under the name it is declared with: ``class Mine(WindowShape, name="mine")``.

    Attributes:
        lookback: how far back (in tokens) a query may still see a key through the window.
        slots: keys a decode state keeps un-folded, the newest ones.
        leaving_per_step: at most this many of those slots leave the window when one token is added.
    """

    name: ClassVar[str] = ""
    lookback: int
    slots: int
    leaving_per_step: int = 1

    def __init_subclass__(cls, name: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name in WINDOW_SHAPES:
            raise ValueError(f"a window shape named {name!r} is already registered ({WINDOW_SHAPES[name].__name__})")
        cls.name = name
        WINDOW_SHAPES[name] = cls

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    def window(self, qp: Tensor, kp: Tensor) -> Tensor:
        """Window pairs among the causal ones: ``qp`` (..., Tq, 1), ``kp`` (..., 1, Tk) real positions with
        kp <= qp where it matters -> (..., Tq, Tk) bool (the caller ands it with causality)."""
        raise NotImplementedError

    def aligned_lookback(self, chunk: int) -> int:
        """The look-back of a chunk of ``chunk`` queries starting at a multiple of ``chunk``, positions counting
        from index 0 in every row (no padding): at most :attr:`lookback`."""
        return self.lookback


class SlidingWindow(WindowShape, name="sliding_window"):
    """The last w keys, the query itself included."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.lookback, self.slots = size - 1, size

    def window(self, qp: Tensor, kp: Tensor) -> Tensor:
        return qp - kp < self.size


class Terraced(WindowShape, name="terraced"):
    """Every key of the query's block of w positions and of the block before it (the original's default)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.lookback, self.slots, self.leaving_per_step = 2 * size - 1, 2 * size, size

    def window(self, qp: Tensor, kp: Tensor) -> Tensor:
        q_block = torch.div(qp, self.size, rounding_mode="floor")
        k_block = torch.div(kp, self.size, rounding_mode="floor")
        return k_block >= q_block - 1

    def aligned_lookback(self, chunk: int) -> int:
        # Blocks start at position 0 for every row, so a chunk starting at t0 sees window keys back to the
        # start of the block before t0's: at most w + (t0 mod w) <= 2w - gcd(C, w) tokens.
        return 2 * self.size - math.gcd(chunk, self.size)


class Linear(WindowShape, name="linear"):
    """No window: every key is in the linear part."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.lookback, self.slots = 0, 0

    def window(self, qp: Tensor, kp: Tensor) -> Tensor:
        return torch.zeros(torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=qp.device)


def first_real_index(valid: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """Index of each row's first real token, shape (B,). Rows without one get their length."""
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (valid.long().cumsum(-1) == 0).sum(-1)
