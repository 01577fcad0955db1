"""Attention over one prefix shared by a batch of continuations, without copying the prefix.

Scoring many prompts that share a start (MMLU's few-shot exemplars) the usual way copies the start's
keys/values once per row of every batch, then again for every query head (GQA), and runs one attention
kernel per row over them. Here the start stays at batch 1 and is only read:

- softmax layers: every query of the batch is scored against the start's keys/values in one attention
  call (the batch folded into the query length), against its own row's tokens causally, and both parts
  share one softmax normaliser. The result is ordinary causal attention over ``prefix + row``. It is a
  transformers attention function (``AttentionInterface``), switched on only inside
  :func:`shared_prefix_attention`.
- linearized layers: :class:`SharedPrefixState`, a cache layer holding the start's (constant-size) decode
  state, which every row reads and none advances (:func:`lolcats.ops.attend_on_state`).

Both are tested against the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from lolcats.attention import LolcatsCacheLayer
from lolcats.ops import DecodeState, attend_after, attend_on_state

NAME = "lolcats_shared_prefix"
# A shared state is read by at most this many new tokens per row in one dense pass (O(T²) per row);
# longer continuations, and padded ones, take the chunked form.
DENSE_MAX_TOKENS = 512


def _flash_op():
    """PyTorch's fused CPU attention kernel, which also returns the log-sum-exp two parts need to be merged
    under one normaliser (a private op: None where this torch has no such op or no CPU build)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, fused: bool) -> tuple[Tensor, Tensor]:
    """Attention of q (N, H, M, D) over k, v (N, Hkv, S, D), query head i reading key/value head i // (H / Hkv),
    and its log-sum-exp (N, H, M) in float32. ``causal`` aligns query i with key i (M == S)."""
    op = _flash_op() if fused and q.device.type == "cpu" else None
    if op is not None:  # the fused kernel reads grouped key/value heads as they are
        out, lse = op(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        return out.float(), lse.float()
    if q.shape[1] != k.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    s = (q.float() * scale) @ k.float().transpose(-1, -2)
    if causal:
        s.masked_fill_(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v.float(), lse


def _prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              sliding_window: int | None = None, softcap: float | None = None,
                              lolcats_prefix: DynamicCache | None = None, lolcats_fused: bool = True,
                              **kwargs: object) -> tuple[Tensor, None]:
    """query (B, H, T, D); key/value (B, Hkv, T, D) of the rows' own tokens. Returns (B, T, H, D)."""
    if lolcats_prefix is None:
        raise RuntimeError(f"attention {NAME!r} needs the shared prefix (lolcats_prefix=...) in the forward call")
    if softcap is not None:
        raise NotImplementedError(f"{NAME}: attention logit soft-capping is not supported")
    layer = lolcats_prefix.layers[module.layer_idx]
    pk, pv = layer.keys, layer.values  # (1, Hkv, P, D)
    b, h, t, d = query.shape
    hkv, p = key.shape[1], pk.shape[2]
    if sliding_window is not None and sliding_window < p + t:
        raise NotImplementedError(f"{NAME}: a sliding window of {sliding_window} tokens binds inside a "
                                  f"{p + t}-token prompt")
    g = h // hkv
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    # Every query of the batch against the prefix, folded into one sequence per key/value head: the
    # prefix is read once, never repeated over rows or query heads.
    q_pre = query.view(b, hkv, g, t, d).permute(1, 2, 0, 3, 4).reshape(1, hkv, g * b * t, d)
    o_pre, lse_pre = _attend_lse(q_pre, pk.to(query.dtype), pv.to(query.dtype), False, scale, lolcats_fused)
    o_pre = o_pre.view(hkv, g, b, t, d).permute(2, 0, 1, 3, 4).reshape(b, h, t, d)
    lse_pre = lse_pre.view(hkv, g, b, t).permute(2, 0, 1, 3).reshape(b, h, t)
    # Each row against its own tokens, causally.
    o_own, lse_own = _attend_lse(query, key, value, True, scale, lolcats_fused)
    # One normaliser over both parts: the prefix's share of it is exp(lse_pre) / (exp(lse_pre) + exp(lse_own)),
    # one blend written straight into the (B, T, H, D) layout the caller wants.
    share = torch.sigmoid(lse_pre - lse_own).unsqueeze(-1)
    out = torch.empty(b, t, h, d, dtype=o_own.dtype, device=o_own.device)
    torch.lerp(o_own, o_pre, share, out=out.transpose(1, 2))
    return out.to(query.dtype), None


AttentionInterface.register(NAME, _prefix_attention_forward)


def _attention_configs(model: nn.Module) -> list:
    configs = [model.config]
    for name in ("text_config", "decoder"):
        sub = getattr(model.config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            configs.append(sub)
    return configs


def supports_shared_prefix(model: nn.Module, max_len: int) -> bool:
    """True when every softmax layer of ``model`` is plain causal attention over ``max_len`` tokens (no
    sliding window that binds, no soft-capping), so the shared-prefix function computes it exactly."""
    for cfg in _attention_configs(model):
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            return False
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            return False
    return True


@contextmanager
def shared_prefix_attention(model: nn.Module) -> Iterator[None]:
    """Run softmax layers with the shared-prefix attention function inside the block; restored after."""
    configs = _attention_configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = NAME
        yield
    finally:
        for c, impl in zip(configs, before, strict=True):
            c._attn_implementation = impl


class SharedPrefixState(LolcatsCacheLayer):
    """A linearized layer's state after a prefix, read by every row of a batch of continuations and never
    advanced: the tokens attend to it without being added to it, so the next batch reads the same state.
    A batch-1 state serves every row without being copied."""

    def __init__(self, state: DecodeState) -> None:
        super().__init__()
        self.state = state

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """q (B, H, T, D), k and v (B, Hkv, T, D) of the rows' own tokens -> (B, H, T, D): a dense pass when
        no row is padded and T is short, else the chunked one."""
        fq, gamma = attn.feature_map_q(q), attn.gamma()
        if attn.spec.sparse:  # the sparse forms are functional: the prefix state is not advanced
            return attn.attend_sparse(self.state.broadcast(q.shape[0]), q, k, v, valid)[0]
        if valid is None and q.shape[2] <= DENSE_MAX_TOKENS and self.state.started():
            return attend_on_state(self.state, q, k, v, fq, gamma, attn.feature_k, attn.spec,
                                   log_decay=attn.log_decay()).to(q.dtype)
        return attend_after(self.state.broadcast(q.shape[0]), q, k, v, fq, gamma, attn.feature_k, attn.spec, valid,
                            log_decay=attn.log_decay())
