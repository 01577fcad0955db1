"""Layer-streaming access to a Hugging Face checkpoint (docs/blockwise.md).

A 405B teacher never fits in memory, so block-by-block work holds the model as a *skeleton*:
every parameter on the meta device (buffers such as rotary frequencies are real and tiny), with only
the modules in use materialised from the checkpoint's safetensors shards and released afterwards.
The model's own forward still builds the attention masks and rotary embeddings: :meth:`layer_inputs`
runs it with stand-ins for the decoder layers and records what each layer would receive.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lolcats.convert import find_decoder_layers

logger = logging.getLogger(__name__)


class TensorIndex:
    """Which safetensors file of a checkpoint folder holds each tensor; loads tensors by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.where = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as handle:
                    self.where.update({name: f for name in handle.keys()})  # noqa: SIM118 (not a dict)
        if not self.where:
            raise FileNotFoundError(f"{self.folder} holds no .safetensors weights; block-by-block work reads the "
                                    "checkpoint layer by layer and needs a safetensors checkpoint")

    def load(self, names: list[str]) -> dict[str, Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ValueError(f"{self.folder}: tensor {missing[0]!r} is not in the checkpoint; block-by-block "
                             "loading needs tensors stored under the model's own parameter names")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(f), "pt") as handle:
                for n in group:
                    out[n] = handle.get_tensor(n)
        return out

    def shape(self, name: str) -> list[int]:
        with safe_open(str(self.where[name]), "pt") as handle:
            return list(handle.get_slice(name).get_shape())

    def rows(self, name: str, start: int, end: int, handle=None) -> Tensor:
        """Rows ``start:end`` of tensor ``name`` (its first dimension), reading only those bytes; ``handle``: the
        already open ``safe_open`` of the file that holds it (one open per file when reading many tensors)."""
        if handle is not None:
            return handle.get_slice(name)[start:end]
        with safe_open(str(self.where[name]), "pt") as opened:
            return opened.get_slice(name)[start:end]


def layer_output(out: Tensor | tuple) -> Tensor:
    """The hidden states a decoder layer returns (a tensor in transformers 5, a tuple in some families)."""
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records its input and keyword arguments, passes the input on."""

    def __init__(self, layer: nn.Module, idx: int, sink: dict[int, tuple[Tensor, dict]], last: bool) -> None:
        super().__init__()
        self.idx, self.sink, self.last = idx, sink, last
        if hasattr(layer, "attention_type"):  # Gemma 3 / Qwen pick their mask by this
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise TypeError("decoder layers are expected to take everything but hidden_states by keyword")
        self.sink[self.idx] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


class StreamingModel:
    """A causal LM whose weights stay on disk until a module is materialised.

    Args:
        path: a local Hugging Face folder with safetensors weights.
        dtype: compute dtype of the materialised modules.
        attn_implementation: the teacher's softmax (``sdpa``, ``eager``, ``flash_attention_2``).
    """

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, device: torch.device | str = "cpu") -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from lolcats.models import FAMILIES, supported_model_types

        self.path, self.dtype, self.device = Path(path), dtype, torch.device(device)
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.config.model_type not in FAMILIES:
            raise ValueError(f"unsupported architecture (model_type {self.config.model_type!r}); supported model "
                             f"types: {', '.join(supported_model_types())}")
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, attn_implementation=attn_implementation,
                                                          trust_remote_code=trust_remote_code)
        self.model.eval().requires_grad_(False)
        for module in self.model.modules():  # buffers (rotary frequencies) are real: move them
            for name, buf in list(module._buffers.items()):
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(self.device)
        self.layers = find_decoder_layers(self.model)
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layer_names = [names[id(layer)] for layer in self.layers]
        self._names = names
        self._index: TensorIndex | None = None

    @property
    def index(self) -> TensorIndex:
        if self._index is None:
            self._index = TensorIndex(self.path)
        return self._index

    def module_name(self, module: nn.Module) -> str:
        return self._names[id(module)]

    def materialize(self, module: nn.Module) -> nn.Module:
        """Load ``module``'s parameters (and persistent buffers) from the checkpoint, in place."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.module_name(module)
        wanted = [n for n, p in module.named_parameters() if p.is_meta]
        tensors = self.index.load([f"{prefix}.{n}" for n in wanted])
        for n in wanted:
            set_module_tensor_to_device(module, n, self.device, value=tensors[f"{prefix}.{n}"], dtype=self.dtype)
        return module

    def release(self, module: nn.Module) -> None:
        """Give ``module``'s parameters back to the meta device (frees their memory)."""
        from accelerate.utils import set_module_tensor_to_device

        for n, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, n, "meta")

    @torch.no_grad()
    def layer_inputs(self, input_ids: Tensor | None = None, seq_len: int | None = None
                     ) -> tuple[Tensor | None, list[dict[str, Any]]]:
        """Run the model's own forward up to the decoder layers.

        Returns:
            The hidden states entering layer 0 (B, T, hidden) when ``input_ids`` is given (the embedding
            is materialised for it), else None; and, per decoder layer, the keyword arguments the model
            passes it (attention mask, rotary cos/sin, positions) for sequences of this length.
        """
        sink: dict[int, tuple[Tensor, dict]] = {}
        originals = list(self.layers)
        n = len(originals)
        for i, layer in enumerate(originals):
            self.layers[i] = _Recorder(layer, i, sink, last=i == n - 1)
        embed = self.model.get_input_embeddings()
        try:
            if input_ids is not None:
                self.materialize(embed)
                self.model.base_model(input_ids=input_ids.to(self.device), use_cache=False)
            else:
                x = torch.zeros(1, seq_len, self.config.hidden_size, dtype=self.dtype, device=self.device)
                self.model.base_model(inputs_embeds=x, use_cache=False)
        except _Stop:
            pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        h0 = sink[0][0] if input_ids is not None else None
        return h0, [sink[i][1] for i in range(n)]
