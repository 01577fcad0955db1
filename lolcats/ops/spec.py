"""What every form of hybrid attention needs to know besides its tensors, in one frozen value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from torch import Tensor

from lolcats.ops.masks import WindowShape, window_shape


@dataclass(frozen=True)
class AttentionSpec:
    """Hybrid sliding-window + linear attention (LoLCATs, paper Eq. 7): which keys the softmax window scores
    and how the parallel form is cut, shared by the reference, chunked, decode and prefix forms.

    Options combine with every window shape as fields: ``sinks`` adds the first real tokens of each sequence
    to every query's exact set (:meth:`masks`). A per-head decay of the linear part is a learned tensor, so
    it is passed to each form beside the window factor (``log_decay``), not held here.

    Attributes:
        variant: a registered window shape (:data:`lolcats.ops.masks.VARIANTS`): ``sliding_window``,
            ``terraced`` or ``linear``.
        window_size: w.
        scale: softmax scaling of q·k (1/√D for most families).
        chunk_size: query chunk C of the O(T) form.
        sinks: s, the first s real tokens of a sequence are scored exactly by every later query ("attention
            sinks") and never enter the linear part.
        sparse: G, a sparse global cache of at most G pairs per key/value head (:mod:`lolcats.ops.sparse`;
            0 = none). Only the sparse forms take it; the chunked and prefix forms refuse it.
    """

    variant: str
    window_size: int
    scale: float
    chunk_size: int = 64
    sinks: int = 0
    sparse: int = 0

    def __post_init__(self) -> None:
        window_shape(self.variant, 1)  # ValueError naming the valid shapes
        for name in ("window_size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionSpec.{name}={value!r} must be a positive integer")
        for name in ("sinks", "sparse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AttentionSpec.{name}={value!r} must be a non-negative integer")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"AttentionSpec.scale={self.scale!r} must be a finite number")

    @cached_property
    def shape(self) -> WindowShape:
        """The window shape with this spec's size."""
        return window_shape(self.variant, self.window_size)

    @property
    def slots(self) -> int:
        """Keys a decode state keeps un-folded: w for sliding_window, 2w for terraced, 0 for linear."""
        return self.shape.slots

    def is_sink(self, pos: Tensor) -> Tensor:
        """Real positions that are sink tokens (0 <= pos < sinks), same shape as ``pos``."""
        return (pos >= 0) & (pos < self.sinks)

    def masks(self, q_pos: Tensor, k_pos: Tensor, sinks_apart: bool = False) -> tuple[Tensor, Tensor]:
        """Which (query, key) pairs use the softmax window and which the linear term (paper Eq. 7).

        Args:
            q_pos: real query positions, shape (..., Tq).
            k_pos: real key positions, shape (..., Tk), broadcastable with ``q_pos``'s leading dims.
            sinks_apart: leave sink keys out of both masks (a form that scores them in a block of their own).

        Returns:
            ``(window, linear)`` boolean masks of shape (..., Tq, Tk). Both are causal and disjoint; sink keys
            are in the window of every later query (or in neither mask with ``sinks_apart``).
        """
        qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
        causal = kp <= qp
        window = causal & self.shape.window(qp, kp)
        if not self.sinks:
            return window, causal & ~window
        sink = self.is_sink(kp)
        if sinks_apart:
            return window & ~sink, causal & ~window & ~sink
        window = window | (causal & sink)
        return window, causal & ~window
