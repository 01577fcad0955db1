"""Per-family facts: how to read q/k/v from a Hugging Face attention module.

Families are registered by ``config.model_type``. All of them take rotary embeddings through the
``apply_rotary_pos_emb`` function of their own modeling module (which handles e.g. Phi-3's partial
rotary), and their own softmax scaling (``module.scaling``: Gemma's ``query_pre_attn_scalar``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

RotaryFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Family:
    """How one model family computes q, k, v.

    Attributes:
        name: family name shown to users.
        model_types: ``config.model_type`` values of the family.
        fused_qkv: one ``qkv_proj`` instead of ``q_proj``/``k_proj``/``v_proj`` (Phi-3).
        qk_norm: per-head RMSNorm ``q_norm``/``k_norm`` before rotary (Qwen3, Gemma 3).
        window_in_config: the native sliding window is ``config.sliding_window`` for every layer
            (Mistral, Mixtral, Phi-3, Phi-3.5-MoE) rather than a per-layer ``module.sliding_window``.
    """

    name: str
    model_types: tuple[str, ...]
    fused_qkv: bool = False
    qk_norm: bool = False
    window_in_config: bool = False

    def child_names(self) -> tuple[str, ...]:
        """Submodules the swapped attention keeps from the original one (same names, same weights)."""
        proj = ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        return proj + (("q_norm", "k_norm") if self.qk_norm else ())

    def lora_targets(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")

    def native_window(self, attn: nn.Module) -> int | None:
        """The sliding window the original layer runs with, or None for full attention."""
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        if self.window_in_config:
            return getattr(attn.config, "sliding_window", None)
        return None

    def project(self, attn: nn.Module, hidden: Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (B, T, hidden) -> q (B, H, T, D), k and v (B, Hkv, T, D), before rotary."""
        b, t, _ = hidden.shape
        if self.fused_qkv:
            qkv = attn.qkv_proj(hidden)
            q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        else:
            q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
        q = q.view(b, t, num_heads, head_dim)
        k = k.view(b, t, num_kv_heads, head_dim)
        v = v.view(b, t, num_kv_heads, head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register_family(Family("llama", ("llama",)))
register_family(Family("mistral", ("mistral",), window_in_config=True))
register_family(Family("mixtral", ("mixtral",), window_in_config=True))
register_family(Family("qwen2", ("qwen2",)))
register_family(Family("qwen3", ("qwen3",), qk_norm=True))
register_family(Family("gemma3", ("gemma3_text",), qk_norm=True))
register_family(Family("phi3", ("phi3",), fused_qkv=True, window_in_config=True))
# Phi-3.5-MoE / GRIN-MoE: separate q/k/v/o with biases, long-rope cos/sin from the model, window from the mask
register_family(Family("phimoe", ("phimoe",), window_in_config=True))


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model: nn.Module) -> Family:
    """The family of a Hugging Face model; ValueError naming the class if unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type {model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


def rotary_function(attn: nn.Module) -> RotaryFn:
    """The ``apply_rotary_pos_emb`` of the attention module's own modeling file."""
    module = sys.modules.get(type(attn).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(attn).__name__} has no apply_rotary_pos_emb in {type(attn).__module__}; "
            "this attention class is not supported"
        )
    return fn
