"""The base model: where it is, its config, its weights and tokenizer, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lolcats.config import ModelConfig
from lolcats.convert import TRAINABLE_KEYS
from lolcats.sources import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                         "_attn_implementation_autoset", "use_cache", "lolcats")


class CheckpointError(ValueError):
    """A model folder, out_dir or checkpoint that does not fit what is asked of it."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device} but no CUDA device is available; use model.device=cpu")
    return torch.device(device)


def base_config(cfg: ModelConfig) -> tuple[str, Any]:
    """(resolved path, HF config) of a recipe's base model, checked for a supported family; no weights read."""
    from transformers import AutoConfig

    path = resolve_model(cfg.name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"model {cfg.name_or_path} could not be loaded ({str(e).splitlines()[0]}); "
                                "check the path or id (the hub may be unreachable offline)") from None
    from lolcats.models import FAMILIES, supported_model_types

    if hf_config.model_type not in FAMILIES:
        archs = ", ".join(getattr(hf_config, "architectures", None) or [type(hf_config).__name__])
        raise ValueError(f"unsupported architecture {archs} (model_type {hf_config.model_type!r}); "
                         f"supported model types: {', '.join(supported_model_types())}")
    return path, hf_config


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"the tokenizer of {path} could not be loaded ({str(e).splitlines()[0]}); the "
                                "folder needs its tokenizer files (tokenizer.json or tokenizer_config.json)") from None


def load_base(cfg: ModelConfig):
    """(model, tokenizer, resolved path) for a recipe's ``model`` section; the model is in eval mode."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path, _ = base_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code).to(pick_device(cfg.device)).eval()
    except (OSError, SafetensorError) as e:
        where = _first_unreadable(Path(path)) or path
        raise CheckpointError(f"the weights of model {cfg.name_or_path} could not be read from {where} "
                              f"({str(e).splitlines()[0]}); the folder needs complete *.safetensors weights: "
                              "copy or download them again") from None
    return model, load_tokenizer(path, cfg.trust_remote_code), path


def _first_unreadable(folder: Path) -> str | None:
    """The first safetensors file of ``folder`` whose header cannot be read, to name it in an error."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError, ValueError):
            return str(f)
    return None


def fingerprint(model: nn.Module, head: Callable[[str, int], Tensor] | None = None) -> str:
    """sha256 of the base model's architecture config plus a few of its tensors (first, middle, last).

    ``head(name, n)`` gives the first n elements of a parameter where the model does not hold them whole (a
    sharded model reads them from its checkpoint: :meth:`lolcats.sharding.ShardedBase.head`)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in _VOLATILE_CONFIG_KEYS:
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = {k: v for k, v in model.state_dict().items() if not any(t in k for t in TRAINABLE_KEYS)
             and "lora_" not in k}
    names = sorted(state)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name in (names[0], names[len(names) // 2], names[-1]):
        h.update(name.encode())
        t = head(name, 65536) if head is not None and name in params else state[name].detach().flatten()[:65536]
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()


def config_sha256(hf_config: Any) -> str:
    """sha256 of a base model's architecture config (the part of :func:`fingerprint` readable without weights)."""
    cfg = hf_config.to_dict()
    for volatile in _VOLATILE_CONFIG_KEYS:
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def cast_base(model: nn.Module, dtype: str) -> nn.Module:
    """Cast the base weights to ``dtype`` (float32 / bfloat16 / float16) for inference; feature maps and
    window factors stay in float32 (linearized layers compute in float32 either way) and so do
    buffers such as rotary frequencies."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(k in name for k in TRAINABLE_KEYS):
            p.data = p.data.to(target)
    return model
