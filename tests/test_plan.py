"""``lolcats plan`` (lolcats/plan.py, lolcats/memory.py): the memory formula against a real tiny model's parameters,
optimizer state and the tensors its forward passes keep, sharding and checkpointing, and the command itself."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lolcats import finetune, training
from lolcats.attention import find_decoder_layers
from lolcats.cli import main
from lolcats.config import AttentionConfig, LolcatsConfig, LoraConfig
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import Chunks
from lolcats.distill import AttentionTransfer
from lolcats.finetune import add_lora, checkpointed_layers, lora_parameters, next_token_loss
from lolcats.memory import checkpoint_bytes, layer_bytes, shapes, stage_memory

REPO = Path(__file__).resolve().parents[1]
# sinks, decay and a chunk spanning two window blocks (so near keys reach the linear part): every term of the formula
ATTENTION = AttentionConfig(window_size=8, feature_dim=8, chunk_size=16, sink_tokens=2, decay=True)
TOKENS = 256


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(**attention) -> LolcatsConfig:
    return LolcatsConfig(attention=replace(ATTENTION, **attention), lora=LoraConfig(r=4))


def converted(cfg: LolcatsConfig, layers: int = 2) -> torch.nn.Module:
    return convert_model(build_tiny("llama", num_hidden_layers=layers), cfg.attention, seed=0)


class HeldTensors(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive when asked (what a forward pass
    leaves for the backward pass); ``skip`` storages (weights) are not counted."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.storages = skip, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                s = t.untyped_storage()
                self.storages[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return out

    def held(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def held(stage: int, cfg: LolcatsConfig, layers: int, checkpointing: bool) -> int:
    """Bytes a forward pass of ``stage`` on a ``layers``-layer tiny Llama keeps for its backward pass."""
    model = converted(cfg, layers)
    ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    if stage == 2:
        model = add_lora(model, cfg.lora, 0).train()
        counter = HeldTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
        with checkpointed_layers(model, checkpointing), counter:
            loss = next_token_loss(model, ids, ids)
    else:
        transfer = AttentionTransfer(model, replace(cfg.distill, activation_checkpointing=checkpointing))
        counter = HeldTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
        with counter:
            loss = transfer.loss(ids)[0]
        transfer.close()
    n = counter.held()
    loss.backward()
    return n


# ------------------------------------------------------------------------------------------------ weights, state
def test_weights_gradients_optimizer_are_the_real_models():
    """Weights, trainable parameters, gradients and AdamW state of both stages equal what the real tiny model and
    its optimizer hold (float32 moments of float32 trainables, no master copy)."""
    cfg = recipe()
    model = converted(cfg)
    s = shapes(cfg, model.config, model)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    one = stage_memory(s, 1, TOKENS, True)
    assert one.weights == real

    params = list(trainable_attention_parameters(model).values())
    assert one.trainable == sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    assert one.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    assert one.optimizer == sum(t.numel() * t.element_size() for t in moments)

    peft_model = add_lora(model, cfg.lora, 0)
    lora = lora_parameters(peft_model)
    two = stage_memory(s, 2, TOKENS, True)
    assert two.trainable == sum(p.numel() for p in lora.values())
    assert two.weights == sum(p.numel() * p.element_size() for p in peft_model.parameters())
    assert two.optimizer == 2 * two.gradients == 2 * 4 * two.trainable


def test_skeleton_counts_equal_the_real_model(tmp_path):
    """The meta-device skeleton plan builds from a config.json has the real model's counts (tied embeddings once)."""
    from lolcats.memory import skeleton

    cfg = recipe()
    model = convert_model(build_tiny("llama", tie_word_embeddings=True), cfg.attention, seed=0)
    model.config.save_pretrained(tmp_path)
    hf_config, _, meta = skeleton(cfg, str(tmp_path / "config.json"))
    assert shapes(cfg, hf_config, meta) == shapes(cfg, model.config, model)


def test_sharding_divides_the_base_and_keeps_gathered_units_and_trainables_whole():
    cfg = recipe()
    model = converted(cfg, layers=12)
    s = shapes(cfg, model.config, model)
    layers = find_decoder_layers(model)
    # the units lolcats.sharding gathers: one decoder layer (its frozen parameters), and everything else
    one_layer = sum(p.numel() for p in layers[0].parameters() if not p.requires_grad)
    assert s.layer_params == one_layer and s.rest_params == s.base_params - len(layers) * one_layer
    m = stage_memory(s, 2, TOKENS, True)
    e = s.dtype_bytes
    assert m.base == s.base_params * e and m.gathered == e * (s.rest_params + 2 * s.layer_params) < m.base
    quarter = m.sharded(4)
    assert quarter.weights == m.weights - m.base + m.base / 4 + m.gathered * 3 / 4
    assert (quarter.gradients, quarter.optimizer, quarter.activations) == (m.gradients, m.optimizer, m.activations)
    assert m.sharded(1) == m
    # the fewest devices on which the sharded total fits
    for n in (2, 3, 5):
        capacity = m.sharded(n).total + 1
        assert m.devices_for(capacity) == n and m.sharded(n - 1).total > capacity
    assert m.devices_for(m.total) == 1
    assert m.devices_for(m.total - m.base + m.gathered) is None  # what every rank holds whole leaves no room
    # a block of block-by-block stage 1 trains in one process: nothing to divide
    block = stage_memory(s, 1, TOKENS, True, layers=1, base_params=one_layer)
    assert block.sharded(4) == block and block.base == 0


# ------------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("stage", [1, 2], ids=["stage1", "stage2"])
@pytest.mark.parametrize("attention", [{}, {"sink_tokens": 0, "decay": False, "chunk_size": 8}],
                         ids=["sinks-decay-near-linear", "plain"])
def test_activation_terms_match_what_a_layer_keeps(stage, attention):
    """Per layer, the formula's bytes are what one more decoder layer adds to the tensors a forward pass keeps for
    the backward pass (measured on 2 and 3 layers), without and with activation checkpointing."""
    cfg = recipe(**attention)
    s = shapes(cfg, converted(cfg).config, converted(cfg))
    for checkpointing, predicted in ((False, layer_bytes(s, stage)), (True, checkpoint_bytes(s, stage))):
        per_layer = held(stage, cfg, 3, checkpointing) - held(stage, cfg, 2, checkpointing)
        assert per_layer == pytest.approx(TOKENS * predicted, rel=0.1), (checkpointing, per_layer, TOKENS * predicted)


def test_checkpointing_reduces_activations():
    cfg = recipe()
    model = converted(cfg, 4)
    s = shapes(cfg, model.config, model)
    for stage in (1, 2):
        on, off = (stage_memory(s, stage, 1024, c).activations for c in (True, False))
        assert on < off / 2, (stage, on, off)
    assert stage_memory(s, 2, 2048, True).activations == 2 * stage_memory(s, 2, 1024, True).activations


# ------------------------------------------------------------------------------------------------ the command
def test_plan_and_its_blockwise_alias_print_the_same(capsys, tmp_path):
    recipe_8b = str(REPO / "recipes" / "llama3_1_8b.yaml")
    assert main(["plan", recipe_8b, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert main(["blockwise", "plan", recipe_8b]) == 0
    assert capsys.readouterr().out == out.replace(f"plan written to {tmp_path / 'plan.json'}\n", "")
    assert "32 layers (32 linearized), hidden 4096, heads 32/8, vocab 128256; 8.03 B base parameters" in out
    p = json.loads((tmp_path / "plan.json").read_text())
    two = p["memory"]["stage2"]
    assert two["checkpointing"] and 16e9 < two["with_checkpointing"]["weights"] < 16.2e9  # 8.03 B × 2 bytes + LoRA
    assert two["with_checkpointing"]["total"] < 20e9 < two["without_checkpointing"]["total"]  # one 80 GB GPU
    assert two["devices_80gb"] == 1 and "fits on one" in out

    # 70B over 8 devices: a per-device column, and the 80 GB devices a sharded stage 2 needs
    assert main(["plan", str(REPO / "recipes" / "llama3_1_70b.yaml"), "--devices", "8", "--json",
                 str(tmp_path / "70b.json")]) == 0
    out = capsys.readouterr().out
    p = json.loads((tmp_path / "70b.json").read_text())
    two = p["memory"]["stage2"]
    assert "total per device on 8 (sharded)" in out and f"needs {two['devices_80gb']}" in out
    on = two["with_checkpointing"]
    assert two["per_device"]["weights"] == pytest.approx(on["weights"] - on["base"] * 7 / 8 + on["gathered"] * 7 / 8)
    assert 17e9 < two["per_device"]["weights"] < 27e9  # 141.6 GB / 8, plus embeddings, head and two layers gathered
    assert two["devices_80gb"] == 2 and "= 13.11 TB" in out  # the block-by-block disk as before


# ------------------------------------------------------------------------------------------------ freed memory
def _rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


@pytest.mark.skipif(training._malloc_trim() is None, reason="glibc malloc_trim only")
def test_release_heap_gives_freed_tensors_back():
    """Tensors of ~100 kB live on the C heap; with live ones between them, their pages stay resident when they are
    freed until release_heap hands them back."""
    keep, junk = [], []
    for i in range(800):
        (keep if i % 8 == 7 else junk).append(torch.ones(25_000))  # 100 kB each
    del junk
    before = _rss()
    assert training.release_heap()
    assert _rss() < before - 40e6, (before, _rss())
    assert len(keep) == 100


@pytest.mark.skipif(training._malloc_trim() is None, reason="glibc malloc_trim only")
def test_release_heap_if_grown_waits_for_the_growth():
    training.release_heap()
    training.release_heap_if_grown(0)  # the mark: what is resident now
    assert not training.release_heap_if_grown(1 << 40)
    keep, junk = [], []
    for i in range(800):
        (keep if i % 8 == 7 else junk).append(torch.ones(25_000))  # 80 MB, 70 of them freed below
    del junk
    assert not training.release_heap_if_grown(200 << 20)  # grew by ~80 MB only
    before = _rss()
    assert training.release_heap_if_grown(40 << 20)
    assert _rss() < before - 40e6, (before, _rss())
    assert not training.release_heap_if_grown(40 << 20)  # nothing grown since
    assert len(keep) == 100


@pytest.mark.parametrize("checkpointing", [True, False])
def test_stage1_releases_the_heap_after_each_layer_and_not_after_close(monkeypatch, checkpointing):
    from lolcats import distill

    calls = []
    monkeypatch.setattr(distill, "release_heap_if_grown", lambda growth: calls.append(growth))
    model = converted(recipe(), layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    transfer = AttentionTransfer(model, replace(LolcatsConfig().distill, activation_checkpointing=checkpointing))
    loss = transfer.loss(ids)[0]
    assert calls == [distill.RELEASE_GROWTH] * 3  # one per decoder layer's forward
    loss.backward()
    transfer.close()
    model(ids)
    assert len(calls) == 3 and not any(layer._forward_hooks for layer in find_decoder_layers(model))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_stage2_releases_the_heap_between_layers_and_before_the_logits(tmp_path, monkeypatch, checkpointing):
    calls = []
    monkeypatch.setattr(finetune, "release_heap", lambda: calls.append(1))
    cfg = recipe()
    model = add_lora(converted(cfg), cfg.lora, 0)
    ids = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    chunks = Chunks(ids[:2], ids[:2].clone())
    loop = LoraConfig(r=4, max_steps=2, grad_accum=1, eval_every=2, checkpoint_every=2,
                      activation_checkpointing=checkpointing)
    finetune.run_stage2(model, chunks, Chunks(ids[2:], ids[2:].clone()), loop, tmp_path, 0, lambda r: None)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * (layers + 1) + 1  # after each layer's forward (checkpointed or not) and before the
    # logits, in both training steps; before the evaluation's logits (its layers run without autograd: no release)
    assert not model.get_output_embeddings()._forward_pre_hooks
    assert not any(layer._forward_hooks for layer in finetune.find_decoder_layers(model))
