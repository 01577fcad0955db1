"""The recipe's ``attention`` section (re-exported by :mod:`lolcats.config`, which holds the other sections)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lolcats.feature_maps import FEATURE_MAPS, INITS
from lolcats.ops.masks import VARIANTS
from lolcats.schema import check_choice, check_int

SOFTMAX_CRITERIA = ("kl_drop", "output_error")  # lolcats.layer_choice.CRITERIA, which measures them


@dataclass
class AttentionConfig:
    """How each softmax attention layer is replaced (docs/design.md §1).

    Attributes:
        variant: ``terraced`` (the original's released default), ``sliding_window`` or ``linear``.
        window_size: w, keys scored by exact softmax (64 in the paper).
        feature_map: name in :data:`lolcats.feature_maps.FEATURE_MAPS`.
        feature_dim: f, width of each Hedgehog half (φ has 2f entries).
        feature_init: ``kaiming`` (the original's released configs) or ``identity``.
        window_factor_init: ω₀, the window factor is γ = sigmoid(ω); −2.197 gives γ ≈ 0.1.
        chunk_size: query chunk of the O(T) form.
        sink_tokens: s, the first s real tokens of every sequence are scored by exact softmax for every later
            query ("attention sinks") and never enter the linear state (0 = none).
        decay: a learnable per-head decay λ = sigmoid(ρ) of the linear part (key j weighs λ^(i−j) for query i).
        decay_init: λ₀, the initial decay of every head, in (0, 1).
        sparse_cache: G, per layer and key/value head at most G key/value pairs that left the window and that the
            linear state recalls worst stay in the exact set (a sparse global cache; 0 = none; docs/retrieval.md).
        sparse_cache_training: train with the sparse cache in place (true), or train without it and add it to the
            finished model (false: the cache is then an inference-time setting, the trained weights are those of
            ``sparse_cache: 0`` and a finished run may change G and resume).
        softmax_layers: N, keep the N layers whose restoring helps most (measured after stage 1) as softmax
            attention; ``skip_layers`` given by hand wins (0 = none).
        softmax_criterion: what ranks the layers for ``softmax_layers`` (:data:`lolcats.layer_choice.CRITERIA`):
            ``kl_drop`` (the drop of KL(original ‖ model) when the layer alone is restored) or ``output_error``
            (its teacher-forced attention error through o_proj, relative to the residual stream).
        skip_layers: decoder-layer indices kept as softmax attention (hybrid models).
        skip_layers_chosen: derived, written by lolcats into a run's recorded config, never set in a recipe: True
            when ``skip_layers`` holds the layers the layer choice picked for ``softmax_layers`` after stage 1,
            False when ``skip_layers`` is the recipe's own. :meth:`recipe` drops a derived list.
        keep_native_window: keep layers the model already runs with a sliding window as they are.
    """

    variant: str = "terraced"
    window_size: int = 64
    feature_map: str = "hedgehog"
    feature_dim: int = 64
    feature_init: str = "kaiming"
    window_factor_init: float = -2.197
    chunk_size: int = 64
    sink_tokens: int = 0
    decay: bool = False
    decay_init: float = 0.999
    sparse_cache: int = 0
    sparse_cache_training: bool = True
    softmax_layers: int = 0
    softmax_criterion: str = "kl_drop"
    skip_layers: list[int] = field(default_factory=list)
    skip_layers_chosen: bool = False
    keep_native_window: bool = False

    def __post_init__(self) -> None:
        check_choice("attention.variant", self.variant, VARIANTS)
        check_choice("attention.feature_map", self.feature_map, sorted(FEATURE_MAPS))
        check_choice("attention.feature_init", self.feature_init, INITS)
        check_int("attention.window_size", self.window_size)
        check_int("attention.feature_dim", self.feature_dim)
        check_int("attention.chunk_size", self.chunk_size)
        check_int("attention.sink_tokens", self.sink_tokens, 0, " (0 = no sinks)")
        check_int("attention.sparse_cache", self.sparse_cache, 0, " (0 = no sparse cache)")
        if self.sparse_cache > 256:
            raise ValueError(f"attention.sparse_cache={self.sparse_cache} is above 256; the sparse cache holds at "
                             "most 256 pairs per layer and key/value head")
        check_int("attention.softmax_layers", self.softmax_layers, 0, " (0 = none)")
        check_choice("attention.softmax_criterion", self.softmax_criterion, SOFTMAX_CRITERIA)
        if not isinstance(self.decay_init, (int, float)) or isinstance(self.decay_init, bool) \
                or not 0 < self.decay_init < 1:
            raise ValueError(f"attention.decay_init={self.decay_init!r} must be a number strictly between 0 and 1 "
                             "(λ₀, e.g. 0.999)")
        if not math.isfinite(float(self.window_factor_init)):
            raise ValueError(f"attention.window_factor_init={self.window_factor_init!r} must be finite")
        for i in self.skip_layers:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"attention.skip_layers contains {i!r}; give non-negative layer indices")
        if self.skip_layers_chosen and (self.softmax_layers == 0 or len(set(self.skip_layers)) != self.softmax_layers):
            raise ValueError(f"attention.skip_layers_chosen=true with skip_layers={self.skip_layers} and softmax_layers="
                             f"{self.softmax_layers}: lolcats writes skip_layers_chosen when it chose softmax_layers "
                             "layers after stage 1; leave it out of a recipe (give softmax_layers, or skip_layers by hand)")

    def training(self) -> AttentionConfig:
        """The attention the stages train: without the sparse cache when it is added only after training
        (``sparse_cache_training: false``)."""
        if self.sparse_cache_training or not self.sparse_cache:
            return self
        return dataclasses.replace(self, sparse_cache=0)

    def recipe(self) -> AttentionConfig:
        """This section as a recipe gives it: a ``skip_layers`` the layer choice derived is dropped, so a rerun of
        a run whose record holds one compares equal to its recipe and chooses again (or reads the choice)."""
        if not self.skip_layers_chosen:
            return self
        return dataclasses.replace(self, skip_layers=[], skip_layers_chosen=False)

    def with_chosen(self, layers: Sequence[int]) -> AttentionConfig:
        """This section with ``layers`` recorded as the softmax layers the layer choice picked."""
        return dataclasses.replace(self, skip_layers=sorted(layers), skip_layers_chosen=True)
