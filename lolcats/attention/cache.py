"""Decode state of linearized layers inside a Hugging Face ``Cache``.

A linearized layer keeps a :class:`lolcats.ops.DecodeState` (constant size) instead of growing
keys/values. :class:`LolcatsCacheLayer` is a ``CacheLayerMixin``, so it lives in any HF cache object
(``DynamicCache`` included) next to the ordinary key/value layers of layers kept as softmax.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from lolcats.ops import DecodeState


class LolcatsCacheLayer(CacheLayerMixin):
    """One linearized layer's decode state."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.state: DecodeState | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        raise TypeError("a linearized layer keeps a recurrent state, not keys/values; it has no update()")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def offload(self) -> None:  # the state is small: it stays where it is
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is None:
            return
        s = self.state
        idx = beam_idx.to(s.kv.device)
        self.state = replace(
            s, kv=s.kv[idx], k_sum=s.k_sum[idx], window_k=s.window_k[idx], window_v=s.window_v[idx],
            window_valid=s.window_valid[idx], first_real=s.first_real[idx])

    def nbytes(self) -> int:
        """Bytes held by this layer's state."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors())


def layer_state(cache: object, layer_idx: int) -> LolcatsCacheLayer:
    """This layer's :class:`LolcatsCacheLayer` in an HF cache, put in place on first use."""
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        factory = cache.layer_class_to_replicate or DynamicLayer
        cache.layers.append(factory())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, LolcatsCacheLayer):
        if layer.get_seq_length() > 0:
            raise ValueError(
                f"layer {layer_idx} of the cache already holds softmax keys/values; "
                "start generation with a fresh cache for a linearized model")
        layer = cache.layers[layer_idx] = LolcatsCacheLayer()
    return layer
