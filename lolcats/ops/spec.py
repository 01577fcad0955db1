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

    Options that change which pairs are scored exactly (sink tokens, extra exact keys) or how old keys are
    weighted (decay) are meant to come as further fields here, combined with every window shape in
    :meth:`masks` and the state's slots, not as one shape per combination.

    Attributes:
        variant: a registered window shape (:data:`lolcats.ops.masks.VARIANTS`): ``sliding_window``,
            ``terraced`` or ``linear``.
        window_size: w.
        scale: softmax scaling of q·k (1/√D for most families).
        chunk_size: query chunk C of the O(T) form.
    """

    variant: str
    window_size: int
    scale: float
    chunk_size: int = 64

    def __post_init__(self) -> None:
        window_shape(self.variant, 1)  # ValueError naming the valid shapes
        for name in ("window_size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionSpec.{name}={value!r} must be a positive integer")
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

    def masks(self, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Which (query, key) pairs use the softmax window and which the linear term (paper Eq. 7).

        Args:
            q_pos: real query positions, shape (..., Tq).
            k_pos: real key positions, shape (..., Tk), broadcastable with ``q_pos``'s leading dims.

        Returns:
            ``(window, linear)`` boolean masks of shape (..., Tq, Tk). Both are causal and disjoint.
        """
        qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
        causal = kp <= qp
        window = causal & self.shape.window(qp, kp)
        return window, causal & ~window
