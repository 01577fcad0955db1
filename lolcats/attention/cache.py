"""Decode state of linearized layers inside a Hugging Face ``Cache``.

A linearized layer keeps a :class:`lolcats.ops.DecodeState` (constant size) instead of growing
keys/values. :class:`LolcatsCacheLayer` is a ``CacheLayerMixin``, so it lives in any HF cache object
(``DynamicCache`` included) next to the ordinary key/value layers of layers kept as softmax
(:class:`lolcats.attention.LolcatsCache` lays one out for a converted model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from lolcats.ops import DecodeState


class LolcatsCacheLayer(CacheLayerMixin):
    """One linearized layer's decode state, advanced by every call of the layer (prefill, then tokens added
    several at once or one by one). A subclass may read its state another way by overriding :meth:`attend`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: DecodeState | None = None

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Attention of the linearized layer ``attn`` (a :class:`lolcats.attention.LolcatsAttention`) over new
        tokens with this state: its own cached path, which advances the state. q (B, H, T, D), k and v
        (B, Hkv, T, D), valid (B, T) or None -> (B, H, T, D)."""
        return attn.attend_cached(q, k, v, valid, self)

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

    def _map_batch(self, fn) -> None:
        """Apply ``fn`` to every per-sequence tensor of the state (batch is dim 0 of each)."""
        if self.state is not None:
            self.state = self.state.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or (tokens_to_remove < 0 and self.get_seq_length() + tokens_to_remove > 0):
            raise NotImplementedError("a linearized layer's recurrent state cannot drop tokens (no crop / "
                                      "assisted decoding); re-run the prompt instead")

    def nbytes(self) -> int:
        """Bytes held by this layer's state."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors())


def cache_nbytes(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (a cache, its layers, states, lists, dicts)."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(cache_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(cache_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(cache_nbytes(v, seen) for v in vars(obj).values())
    return 0


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
