"""Base-model loading, fingerprints, and the out_dir checkpoint format (DESIGN.md §4).

out_dir/
  lolcats_config.json     format version, resolved config, base model reference + fingerprint, versions
  attention.safetensors   feature maps + window factors of every linearized layer
  adapter/                peft LoRA (adapter_config.json + adapter_model.safetensors)
  metrics.jsonl, report.md, attention_mse.png
  train_state/            resume state, kept apart from results
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lolcats.config import AttentionConfig, ModelConfig, from_dict
from lolcats.convert import TRAINABLE_KEYS, convert_model, linearized_layers
from lolcats.training import atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "lolcats_config.json"
ATTENTION_FILE = "attention.safetensors"
ADAPTER_DIR = "adapter"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """An out_dir or checkpoint that does not fit what is asked of it."""


# ------------------------------------------------------------------------------------ base model
def resolve_model_path(name_or_path: str) -> str:
    """``lolcats:smollm2-135m-instruct`` -> fetched folder; ``*.gguf`` -> cached float32 folder; else as given."""
    from lolcats import assets

    if name_or_path.startswith("lolcats:"):
        name = name_or_path.split(":", 1)[1]
        if name == "tiny-llama":
            return str(assets.tiny_llama())
        if name != "smollm2-135m-instruct":
            raise ValueError(f"unknown offline model {name_or_path!r}; choose lolcats:smollm2-135m-instruct "
                             "or lolcats:tiny-llama")
        p = assets.paths()
        return str(assets.gguf_to_safetensors(assets.fetch_smollm2_gguf(p), p.smollm2, note=assets.GGUF_NOTE))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {name_or_path} does not exist")
        digest = assets.sha256(path)[:12]
        out = assets.cache_dir() / "gguf-expanded" / f"{path.stem}-{digest}"
        return str(assets.gguf_to_safetensors(path, out, note=f"{path.name} expanded to float32"))
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {name_or_path} has no config.json; give a Hugging Face model "
                                    "folder, a .gguf file or a hub id")
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model path {name_or_path} does not exist; give a Hugging Face model folder, "
                                "a .gguf file, a hub id or lolcats:smollm2-135m-instruct")
    return name_or_path  # a hub id


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device} but no CUDA device is available; use model.device=cpu")
    return torch.device(device)


def load_base(cfg: ModelConfig):
    """(model, tokenizer, resolved path) for a recipe's ``model`` section; the model is in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"model {cfg.name_or_path} could not be loaded ({str(e).splitlines()[0]}); "
                                "check the path or id (the hub may be unreachable offline)") from None
    from lolcats.models import FAMILIES, supported_model_types

    if hf_config.model_type not in FAMILIES:
        archs = ", ".join(getattr(hf_config, "architectures", None) or [type(hf_config).__name__])
        raise ValueError(f"unsupported architecture {archs} (model_type {hf_config.model_type!r}); "
                         f"supported model types: {', '.join(supported_model_types())}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code).to(pick_device(cfg.device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, path


def fingerprint(model: nn.Module) -> str:
    """sha256 of the base model's architecture config plus a few of its tensors (first, middle, last)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                     "_attn_implementation_autoset", "use_cache", "lolcats"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = {k: v for k, v in model.state_dict().items() if not any(t in k for t in TRAINABLE_KEYS)
             and "lora_" not in k}
    names = sorted(state)
    for name in (names[0], names[len(names) // 2], names[-1]):
        h.update(name.encode())
        h.update(state[name].detach().flatten()[:65536].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ out_dir
def versions() -> dict[str, str]:
    import peft
    import transformers

    import lolcats

    return {"lolcats": lolcats.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def read_run_config(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {data.get('format_version')}, this lolcats reads "
                              f"{FORMAT_VERSION}")
    return data


def write_run_config(out_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(out_dir) / CONFIG_FILE, json.dumps({"format_version": FORMAT_VERSION, **record},
                                                              indent=2, default=str))


def attention_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Feature maps and window factors of every linearized layer, keyed by layer index."""
    out = {}
    for layer in linearized_layers(model):
        for name, t in layer.named_parameters():
            if name.startswith(TRAINABLE_KEYS):
                out[f"layers.{layer.layer_idx}.{name}"] = t.detach()
    return out


def save_attention(model: nn.Module, path: Path) -> None:
    atomic_save_safetensors(attention_state(model), Path(path), metadata={"format": "lolcats-attention"})


def load_attention(model: nn.Module, path: Path) -> None:
    """Load :func:`attention_state` tensors; names and shapes must match exactly."""
    saved = load_file(str(path))
    current = attention_state(model)
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or extra:
        raise CheckpointError(f"{path} does not fit the model: "
                              + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
                              + f" (checkpoint has {len(saved)} tensors, model expects {len(current)})")
    for name, t in current.items():
        if saved[name].shape != t.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)} in the checkpoint but "
                                  f"{tuple(t.shape)} in the model")
    with torch.no_grad():
        for name, t in current.items():
            t.copy_(saved[name])


def _load_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    return state


def load(out_dir: str | os.PathLike, base: str | None = None, device: str | None = None) -> nn.Module:
    """Rebuild a linearized model from an out_dir (base + attention + adapter) or an exported folder.

    Args:
        out_dir: a ``lolcats linearize`` result, or a ``lolcats export --merge`` folder.
        base: another path/id for the base model (its fingerprint must still match).
        device: override the recorded device.

    Returns:
        The model in eval mode (a peft model when an unmerged adapter is present).
    """
    out = Path(out_dir).expanduser()
    record = read_run_config(out)
    if record is None:
        raise FileNotFoundError(f"{out} has no {CONFIG_FILE}; it is not a lolcats checkpoint")
    attn_cfg = from_dict(AttentionConfig, record["config"]["attention"], "attention")
    model_cfg = from_dict(ModelConfig, record["config"]["model"], "model")
    if device is not None:
        model_cfg = dataclasses.replace(model_cfg, device=device)
    if record.get("merged"):
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(out)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[model_cfg.dtype],
                                                 attn_implementation=model_cfg.attn_implementation)
        convert_model(model, attn_cfg)
        state = _load_folder_state(out)
        result = model.load_state_dict(state, strict=False)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
        bad = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
        if bad or result.unexpected_keys:
            raise CheckpointError(f"{out}: weights do not fit the model (missing {bad[:1]}, unexpected "
                                  f"{result.unexpected_keys[:1]})")
        return model.to(pick_device(model_cfg.device)).eval()

    if base is not None:
        model_cfg = dataclasses.replace(model_cfg, name_or_path=base)
    model, _, _ = load_base(model_cfg)
    expected = record["base_model"]["fingerprint"]
    got = fingerprint(model)
    if got != expected:
        raise CheckpointError(
            f"base model mismatch: {out} was trained on {record['base_model']['name_or_path']} (fingerprint "
            f"{expected[:16]}…) but {model_cfg.name_or_path} has fingerprint {got[:16]}…; pass the original base")
    convert_model(model, attn_cfg)
    load_attention(model, out / ATTENTION_FILE)
    if (out / ADAPTER_DIR / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(out / ADAPTER_DIR))
    return model.eval()


def export_merged(out_dir: str | os.PathLike, to: str | os.PathLike) -> Path:
    """Write one self-contained model: base weights with LoRA merged plus attention weights."""
    out, dest = Path(out_dir), Path(to)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new --to folder")
    model = load(out, device="cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    record = read_run_config(out)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer_files = [f for f in Path(resolve_model_path(record["base_model"]["name_or_path"])).glob("*")
                       if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config"))]
    for f in tokenizer_files:
        shutil.copy2(f, tmp / f.name)
    write_run_config(tmp, {k: v for k, v in record.items() if k != "format_version"} | {"merged": True})
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return dest


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model_any(spec: str, device: str | None = None):
    """(model, tokenizer) from an out_dir, an exported folder, an HF folder or id, or a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if (path / CONFIG_FILE).exists():
        record = read_run_config(path)
        model = load(path, device=device)
        tok_src = path if record.get("merged") else resolve_model_path(record["base_model"]["name_or_path"])
        return model, AutoTokenizer.from_pretrained(tok_src)
    cfg = ModelConfig(name_or_path=spec, device=device or "auto")
    model, tokenizer, _ = load_base(cfg)
    return model, tokenizer
