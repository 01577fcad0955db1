"""The out_dir format: run record, result weights and their checksums, and rebuilding a model from it.

out_dir/
  lolcats_config.json     format version, resolved config, base model reference + fingerprint, versions
  attention.safetensors   feature maps + window factors of every linearized layer
  adapter/                peft LoRA (adapter_config.json + adapter_model.safetensors)
  metrics.jsonl, report.md, attention_mse.png
  train_state/            resume state, kept apart from results
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lolcats.base_model import (
    DTYPES,
    CheckpointError,
    base_config,
    config_sha256,
    fingerprint,
    load_base,
    load_tokenizer,
    pick_device,
)
from lolcats.config import AttentionConfig, ModelConfig, from_dict
from lolcats.convert import TRAINABLE_KEYS, convert_model, linearized_layers
from lolcats.io import atomic_save_safetensors, atomic_write_dir, atomic_write_text, sha256_file
from lolcats.sources import resolve_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 5  # 2: format marker, sha256 of every result file, base config sha256; 3: sinks, decay;
# 4: softmax layers chosen from data (layer_choice.json, attention.skip_layers_chosen), attention.sparse_cache;
# 5: attention.sparse_cache_training
FORMAT_MARKER = "lolcats-out-dir"
CONFIG_FILE = "lolcats_config.json"
ATTENTION_FILE = "attention.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"




# ------------------------------------------------------------------------------------ out_dir
def versions() -> dict[str, str]:
    import peft
    import transformers

    import lolcats

    return {"lolcats": lolcats.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def read_run_config(out_dir: Path) -> dict[str, Any] | None:
    """The out_dir's ``lolcats_config.json``, checked for format; None when there is none.

    Format 1 (lolcats 0.1 before checksums) is read as is: such an out_dir loads, but carries no
    sha256 of its weights, so nothing can be verified, and a rerun is refused (see :func:`prepare`).
    """
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        return None
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a lolcats run record; choose another out_dir")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged: restore it, or start the run "
                              "again with --overwrite") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise CheckpointError(f"{path} is not a lolcats run record (no format_version); point to a lolcats out_dir")
    version = data["format_version"]
    if isinstance(version, bool) or version not in range(1, FORMAT_VERSION + 1):
        raise CheckpointError(f"{path} has format version {version!r}; this lolcats reads versions 1 to "
                              f"{FORMAT_VERSION}: install the lolcats that wrote it")
    if version >= 2 and data.get("format") != FORMAT_MARKER:
        raise CheckpointError(f"{path} lacks the lolcats format marker; it was not written by lolcats")
    for key in ("config", "base_model"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} section; the file is damaged: restore it, or start the run "
                                  "again with --overwrite")
    return data


def is_run_dir(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a lolcats run record (the only kind of folder ``--overwrite`` deletes)."""
    try:
        return read_run_config(out_dir) is not None
    except CheckpointError:
        return False


def write_run_config(out_dir: Path, record: dict[str, Any]) -> None:
    record = {k: v for k, v in record.items() if k not in ("format", "format_version")}
    atomic_write_text(Path(out_dir) / CONFIG_FILE, json.dumps(
        {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, **record}, indent=2, default=str))


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    """Each file named in ``expected`` (relative to ``folder``) must exist and have that sha256.

    Raises:
        CheckpointError: naming the first file that is missing or changed, and what to do.
    """
    folder = Path(folder)
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; restore it or rerun with --overwrite")
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(f"{path} has changed since lolcats wrote it (sha256 {got[:12]}…, recorded "
                                  f"{want[:12]}…); restore the file or rerun the run with --overwrite")


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights with inf/nan, naming the tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name} holds non-finite values (inf or nan); the file is damaged "
                                  "or training diverged: restore it or train again")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or damaged file is a CheckpointError naming it."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; restore it or rerun with --overwrite")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                              "restore it or train again") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                              "restore it or train again") from None


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


def check_shapes(path: Path, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Attention tensors in ``path`` must be exactly those the model expects, by name and shape."""
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path} does not fit the model: "
                              + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
                              + f" (checkpoint has {len(saved)} tensors, model expects {len(expected)})")
    for name, shape in expected.items():
        if tuple(saved[name]) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name])} in the checkpoint but "
                                  f"{tuple(shape)} in the model")


def chosen_softmax_layers(attn_cfg: AttentionConfig) -> list[int]:
    """Layers the layer choice restored to softmax after stage 1 (``attention.skip_layers_chosen``): stage 1's
    weights of them stay in attention.safetensors (one stage-1 result serves any ``softmax_layers``) and are
    not the model's."""
    return list(attn_cfg.skip_layers) if attn_cfg.skip_layers_chosen else []


def _without_layers(named: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    prefixes = tuple(f"layers.{i}." for i in layers)
    return {k: v for k, v in named.items() if not k.startswith(prefixes)}


def load_attention(model: nn.Module, path: Path, softmax_layers: list[int] | None = None) -> None:
    """Load :func:`attention_state` tensors; names and shapes must match exactly, values be finite. Tensors of
    ``softmax_layers`` (:func:`chosen_softmax_layers`) are left out."""
    saved = _without_layers(read_safetensors(path), softmax_layers or [])
    current = attention_state(model)
    check_shapes(path, {k: tuple(v.shape) for k, v in saved.items()}, {k: tuple(v.shape) for k, v in current.items()})
    check_finite(saved, path)
    with torch.no_grad():
        for name, t in current.items():
            t.copy_(saved[name])


def save_adapter(peft_model: nn.Module, out: Path) -> str:
    """Write the LoRA adapter to ``out/adapter`` atomically; returns the sha256 of its weights."""
    atomic_write_dir(out / ADAPTER_DIR, lambda tmp: peft_model.save_pretrained(str(tmp)))
    return sha256_file(out / ADAPTER_WEIGHTS)


def load_adapter_weights(peft_model: nn.Module, out: Path) -> None:
    """Load ``out/adapter``'s weights into a peft model built with the same LoRA settings."""
    from peft import set_peft_model_state_dict

    path = out / ADAPTER_WEIGHTS
    state = read_safetensors(path)
    check_finite(state, path)
    set_peft_model_state_dict(peft_model, state)


def _meta_attention_shapes(hf_config: Any, attn_cfg: AttentionConfig, trust_remote_code: bool = False
                           ) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the attention tensors a base of ``hf_config`` converted with ``attn_cfg`` has
    (built on the meta device: nothing is allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        convert_model(meta, attn_cfg)
    return {k: tuple(v.shape) for k, v in attention_state(meta).items()}


def _record_configs(out: Path, record: dict[str, Any]) -> tuple[AttentionConfig, ModelConfig]:
    try:
        return (from_dict(AttentionConfig, record["config"]["attention"], "attention"),
                from_dict(ModelConfig, record["config"]["model"], "model"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{out / CONFIG_FILE}: its config is not one this lolcats reads ({e}); the file is "
                              "damaged or from another version") from None


def _load_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(read_safetensors(f))
    if not state:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    return state


def load(out_dir: str | os.PathLike, base: str | None = None, device: str | None = None,
         trust_remote_code: bool = False, verify: bool = False) -> nn.Module:
    """Rebuild a linearized model from an out_dir (base + attention + adapter) or an exported folder.

    What the files say is checked before any model is built: the run record's format, the base
    model's config against the one trained on, the attention tensors' names and shapes, and the
    sha256 of ``attention.safetensors`` and the adapter weights recorded when they were written.

    Args:
        out_dir: a ``lolcats linearize`` result, or a ``lolcats export --merge`` folder.
        base: another path/id for the base model (its fingerprint must still match).
        device: override the recorded device.
        trust_remote_code: let the base model's own Python code run. Only the caller can enable it:
            the value recorded in the out_dir is never used.
        verify: for an exported folder, also check every file's sha256 (slow for large models; an
            out_dir's small result files are always checked).

    Returns:
        The model in eval mode (a peft model when an unmerged adapter is present).
    """
    out = Path(out_dir).expanduser()
    record = read_run_config(out)
    if record is None:
        raise FileNotFoundError(f"{out} has no {CONFIG_FILE}; it is not a lolcats checkpoint")
    attn_cfg, model_cfg = _record_configs(out, record)
    model_cfg = dataclasses.replace(model_cfg, trust_remote_code=trust_remote_code)
    if device is not None:
        model_cfg = dataclasses.replace(model_cfg, device=device)
    files = record.get("files", {})
    if record.get("merged"):
        return _load_merged(out, record, attn_cfg, model_cfg, verify)

    if base is not None:
        model_cfg = dataclasses.replace(model_cfg, name_or_path=base)
    verify_files(out, {k: v for k, v in files.items() if k in (ATTENTION_FILE, ADAPTER_WEIGHTS)})
    _, hf_config = base_config(model_cfg)
    expected_cfg = record["base_model"].get("config_sha256")
    if expected_cfg is not None and config_sha256(hf_config) != expected_cfg:
        raise CheckpointError(
            f"base model mismatch: {out} was trained on {record['base_model'].get('name_or_path')} but the config of "
            f"{model_cfg.name_or_path} differs (architecture sha256 {config_sha256(hf_config)[:16]}… vs "
            f"{expected_cfg[:16]}…); pass the original base")
    softmax_layers = chosen_softmax_layers(attn_cfg)
    check_shapes(out / ATTENTION_FILE, _without_layers(safetensors_shapes(out / ATTENTION_FILE), softmax_layers),
                 _meta_attention_shapes(hf_config, attn_cfg, trust_remote_code))
    model, _, _ = load_base(model_cfg)
    expected = record["base_model"]["fingerprint"]
    got = fingerprint(model)
    if got != expected:
        raise CheckpointError(
            f"base model mismatch: {out} was trained on {record['base_model']['name_or_path']} (fingerprint "
            f"{expected[:16]}…) but {model_cfg.name_or_path} has fingerprint {got[:16]}…; pass the original base")
    convert_model(model, attn_cfg)
    load_attention(model, out / ATTENTION_FILE, softmax_layers)
    if (out / ADAPTER_DIR / "adapter_config.json").exists():
        from peft import PeftModel

        check_finite(read_safetensors(out / ADAPTER_WEIGHTS), out / ADAPTER_WEIGHTS)
        try:
            model = PeftModel.from_pretrained(model, str(out / ADAPTER_DIR))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{out / ADAPTER_DIR} is unreadable ({str(e).splitlines()[0]}); restore it or "
                                  "train stage 2 again") from None
    return model.eval()


def _load_merged(out: Path, record: dict[str, Any], attn_cfg: AttentionConfig, model_cfg: ModelConfig,
                 verify: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if verify:
        verify_files(out, record.get("files", {}))
    try:
        hf_config = AutoConfig.from_pretrained(out, trust_remote_code=False)  # an export is a plain HF folder
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{out / 'config.json'} is unreadable ({str(e).splitlines()[0]}); restore it or "
                              "export again") from None
    model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[model_cfg.dtype], trust_remote_code=False,
                                             attn_implementation=model_cfg.attn_implementation)
    convert_model(model, attn_cfg)
    state = _load_folder_state(out)
    check_finite({k: v for k, v in state.items() if any(t in k for t in TRAINABLE_KEYS)}, out)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    bad = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if bad or result.unexpected_keys:
        raise CheckpointError(f"{out}: weights do not fit the model (missing {bad[:1]}, unexpected "
                              f"{result.unexpected_keys[:1]})")
    return model.to(pick_device(model_cfg.device)).eval()


def load_model_any(spec: str, device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from an out_dir, an exported folder, an HF folder or id, or a .gguf file.

    ``trust_remote_code`` is the caller's choice alone (a CLI flag); files being loaded never enable it."""
    path = Path(spec).expanduser()
    if (path / CONFIG_FILE).exists():
        record = read_run_config(path)
        model = load(path, device=device, trust_remote_code=trust_remote_code)
        tok_src = path if record.get("merged") else resolve_model(record["base_model"]["name_or_path"])
        return model, load_tokenizer(str(tok_src), trust_remote_code)
    cfg = ModelConfig(name_or_path=spec, device=device or "auto", trust_remote_code=trust_remote_code)
    model, tokenizer, _ = load_base(cfg)
    return model, tokenizer
