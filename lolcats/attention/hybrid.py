"""The swapped attention layer: the original projections, Hedgehog feature maps, a softmax window."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lolcats.attention.cache import LolcatsCacheLayer, layer_state
from lolcats.config import AttentionConfig
from lolcats.feature_maps import build_feature_map
from lolcats.models import Family, rotary_function
from lolcats.ops import AttentionSpec, decode_step, extend_state, hybrid_attention_chunked, prefill_state, repeat_kv
from lolcats.ops.sparse import empty_sparse_state, sparse_extend


def token_validity(attention_mask: Tensor | None, q_len: int) -> Tensor | None:
    """(B, q_len) bool, False for padding among the current tokens, from whatever mask HF passes.

    HF gives a 2D padding mask (flash-attention), a 4D boolean mask (sdpa) or a 4D additive float
    mask (eager). A current token is real iff it may attend to itself: the diagonal of the last
    q_len key columns. This also holds for sliding-window masks.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -q_len:].bool()
    m = attention_mask[:, 0, -q_len:, -q_len:]  # (B, q_len, q_len)
    diag = m.diagonal(dim1=-2, dim2=-1)
    if diag.dtype != torch.bool:
        diag = diag == 0
    return diag


class LolcatsAttention(nn.Module):
    """Hybrid sliding-window + linear attention (LoLCATs, paper Eq. 7) in place of softmax attention.

    Keeps the original module's q/k/v/o projections (and q/k norms) under their original names, so
    state dicts and LoRA target names are unchanged; adds per-head feature maps for q and k and a
    per-head window factor γ = sigmoid(ω) and, with ``attention.decay``, a per-head decay λ = sigmoid(ρ) of the
    linear part. Without a cache it attends in parallel; with one, a prompt is
    summarised into a decode state (prefill), which later tokens extend, several at once or one by one.
    With ``attention.sparse_cache`` (an inference-time setting, :func:`set_sparse_cache`) every form runs
    chunk by chunk with a sparse global cache (:mod:`lolcats.ops.sparse`).
    """

    def __init__(self, base: nn.Module, family: Family, config: AttentionConfig, layer_idx: int,
                 num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        for name in family.child_names():
            self.add_module(name, getattr(base, name))
        self.family = family
        self.attn_config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = base.head_dim
        self.scaling = float(base.scaling)
        self.native_window = family.native_window(base)
        self.hf_config = getattr(base, "config", None)
        self._rotary = rotary_function(base)
        self.spec = AttentionSpec(config.variant, config.window_size, self.scaling, config.chunk_size,
                                  sinks=config.sink_tokens, sparse=config.sparse_cache)
        # trainable weights live beside the base weights, in float32 or wider
        ref = next(base.parameters())
        device, dtype = ref.device, torch.promote_types(ref.dtype, torch.float32)
        self.feature_map_q = build_feature_map(
            config.feature_map, num_heads, self.head_dim, config.feature_dim, config.feature_init
        ).to(device=device, dtype=dtype)
        self.feature_map_k = build_feature_map(
            config.feature_map, num_heads, self.head_dim, config.feature_dim, config.feature_init
        ).to(device=device, dtype=dtype)
        self.window_factor = nn.Parameter(
            torch.full((num_heads,), float(config.window_factor_init), device=device, dtype=dtype))
        if config.decay:  # λ = sigmoid(ρ) per head, ρ₀ = logit(λ₀)
            rho = math.log(config.decay_init / (1 - config.decay_init))
            self.decay_logit = nn.Parameter(torch.full((num_heads,), rho, device=device, dtype=dtype))
        else:
            self.decay_logit = None

    def extra_repr(self) -> str:
        c = self.attn_config
        return (f"layer={self.layer_idx}, variant={c.variant}, window={c.window_size}, sinks={c.sink_tokens}, "
                f"decay={c.decay}, sparse_cache={self.spec.sparse}, feature_map={c.feature_map}, "
                f"heads={self.num_heads}/{self.num_kv_heads}")

    def qkv(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D), k and v (B, Hkv, T, D), after q/k norm and rotary, as the original computes them."""
        q, k, v = self.family.project(self, hidden_states, self.num_heads, self.num_kv_heads, self.head_dim)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        return q, k, v

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """φ_q(q) and φ_k(k) with k repeated to the query heads: (B, H, T, F) each."""
        return self.feature_map_q(q), self.feature_map_k(repeat_kv(k, self.num_heads // self.num_kv_heads))

    def feature_k(self, k: Tensor) -> Tensor:
        return self.feature_map_k(k)

    def gamma(self) -> Tensor:
        """(H,) window factor γ = sigmoid(ω)."""
        return torch.sigmoid(self.window_factor)

    def log_decay(self) -> Tensor | None:
        """(H,) log λ = log sigmoid(ρ) of the linear part's decay, or None without decay."""
        return None if self.decay_logit is None else nn.functional.logsigmoid(self.decay_logit)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: object | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, None]:
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        dtype = torch.promote_types(q.dtype, torch.float32)  # half inputs compute in float32
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        valid = token_validity(attention_mask, t)
        if valid is not None and bool(valid.all()):
            valid = None  # no padding: lets the chunked form use block-aligned chunks
        if past_key_values is None:
            y = self.attend(q, k, v, valid)
        else:  # the cache layer decides how its state is read; a LolcatsCacheLayer calls attend_cached
            y = layer_state(past_key_values, self.layer_idx).attend(self, q, k, v, valid)
        y = y.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return self.o_proj(y), None

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor,
                  valid: Tensor | None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Chunked O(T) form: the output, φ_k of the keys and the pass's totals (a prefill reuses both)."""
        fq, fk = self.features(q, k)
        y, totals = hybrid_attention_chunked(q, k, v, fq, fk, self.gamma(), self.spec, valid,
                                             log_decay=self.log_decay())
        return y, fk, totals

    def attend(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Parallel O(T) form over a whole sequence: (B, H, T, D) -> (B, H, T, D)."""
        if self.spec.sparse:
            return self.attend_sparse(None, q, k, v, valid)[0]
        return self._parallel(q, k, v, valid)[0]

    def attend_sparse(self, state: object, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> tuple[Tensor, object]:
        """T tokens on a sparse-cache state (a new one when ``state`` is None): ``(y, new_state)``."""
        if state is None:
            state = empty_sparse_state(q.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, v.shape[-1],
                                       self.feature_map_k.out_dim, self.spec, dtype=k.dtype, device=q.device)
        y, state = sparse_extend(state, q, k, v, self.feature_map_q(q), self.gamma(), self.feature_k, self.spec,
                                 valid, log_decay=self.log_decay())
        return y.to(q.dtype), state

    def attend_cached(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
                      cache: LolcatsCacheLayer) -> Tensor:
        """Attend with a decode state and advance it: a prompt runs in parallel and is summarised (prefill);
        later tokens extend the state, several at once in chunked form or one by one (decode)."""
        if self.spec.sparse:
            y, cache.state = self.attend_sparse(cache.state, q, k, v, valid)
            return y
        if cache.state is None:
            y, fk, totals = self._parallel(q, k, v, valid)
            cache.state = prefill_state(k, v, fk, self.spec, valid, totals=totals, log_decay=self.log_decay())
            return y
        fq = self.feature_map_q(q)
        if q.shape[2] > 1:  # several tokens on top of a state (a cached prefix): chunked
            y, cache.state = extend_state(cache.state, q, k, v, fq, self.gamma(), self.feature_k, self.spec, valid,
                                          log_decay=self.log_decay())
            return y
        y, cache.state = decode_step(cache.state, q, k, v, fq, self.gamma(), self.feature_k, self.spec,
                                     None if valid is None else valid[:, 0], log_decay=self.log_decay())
        return y


def set_sparse_cache(model: nn.Module, size: int) -> int:
    """Give every linearized layer of ``model`` a sparse global cache of ``size`` pairs per key/value head (0
    removes it): an inference-time setting, no weights change. Returns the number of layers set."""
    from dataclasses import replace

    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 256:
        raise ValueError(f"sparse cache size {size!r} must be an integer from 0 to 256 (0 = none)")
    layers = [m for m in model.modules() if isinstance(m, LolcatsAttention)]
    for layer in layers:
        layer.attn_config = replace(layer.attn_config, sparse_cache=size)
        layer.spec = replace(layer.spec, sparse=size)
    return len(layers)
