"""Activation checkpointing (``distill.activation_checkpointing``, ``lora.activation_checkpointing``): the same
weights as without it, fewer activations held for the backward pass, the switch validated."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lolcats.attention import find_decoder_layers
from lolcats.config import AttentionConfig, DistillConfig, LoraConfig, load_config
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import Chunks
from lolcats.distill import AttentionTransfer, run_stage1
from lolcats.finetune import add_lora, checkpointed_layers, lora_parameters, next_token_loss, run_stage2, stage2_loss

ATTENTION = AttentionConfig(window_size=8, feature_dim=8, chunk_size=16)
LORA = LoraConfig(max_steps=4, grad_accum=2, lr=1e-3, eval_every=2, checkpoint_every=2)
DISTILL = DistillConfig(max_steps=4, grad_accum=2, eval_every=2, checkpoint_every=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def converted(family: str = "llama", attention: AttentionConfig = ATTENTION, **overrides) -> torch.nn.Module:
    return convert_model(build_tiny(family, **overrides), attention, seed=0)


def with_lora(model: torch.nn.Module, lora: LoraConfig = LORA) -> torch.nn.Module:
    peft_model = add_lora(model, lora, 0)
    with torch.no_grad():  # non-zero B, so that every LoRA weight gets a gradient from the first step
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return peft_model


def random_chunks(n: int, seq_len: int, seed: int = 0, vocab: int = 128) -> Chunks:
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # a masked prompt
    return Chunks(ids, labels)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


class HeldTensors(TorchDispatchMode):
    """Bytes of every tensor storage an op creates inside the mode and that is still alive when asked (what a
    forward pass leaves held for the backward pass, checkpoint inputs included); ``skip`` storages (weights)
    are not counted."""

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


def held_by_forward(model: torch.nn.Module, loss_fn) -> int:
    counter = HeldTensors({p.untyped_storage().data_ptr() for p in model.parameters()})
    with counter:
        loss = loss_fn()
    held = counter.held()
    loss.backward()  # the graph is complete: the backward pass runs (recomputing) and frees it
    return held


# ------------------------------------------------------------------------------------------------ same weights
@pytest.mark.parametrize("loss,dropout", [("next_token", 0.0), ("kl", 0.0), ("next_token", 0.2)],
                         ids=["next-token", "kl", "lora-dropout"])
def test_stage2_weights_equal_with_and_without_checkpointing(tmp_path, loss, dropout):
    """A few optimizer steps of stage 2 give the same LoRA weights either way (dropout: the recompute replays
    the RNG, so it draws the same masks)."""
    train, heldout = random_chunks(4, 48), random_chunks(1, 48, seed=1)
    weights = {}
    for on in (False, True):
        cfg = replace(LORA, loss=loss, dropout=dropout, activation_checkpointing=on)
        model = with_lora(converted(), cfg)
        torch.manual_seed(0)
        run_stage2(model, train, heldout, cfg, tmp_path / str(on), 0, lambda r: None)
        weights[on] = {k: v.detach().clone() for k, v in lora_parameters(model).items()}
        assert all("forward" not in layer.__dict__ for layer in find_decoder_layers(model))  # put back
    assert_same(weights[True], weights[False])
    start = {k: v.detach() for k, v in lora_parameters(with_lora(converted(), LORA)).items()}
    assert any(not torch.equal(weights[True][k], start[k]) for k in start)  # it trained


@pytest.mark.parametrize("attention_ce_weight", [0.0, 0.5], ids=["mse", "mse+attention-ce"])
def test_stage1_weights_equal_with_and_without_checkpointing(tmp_path, attention_ce_weight):
    attention = replace(ATTENTION, sink_tokens=2, decay=True)
    train, heldout = random_chunks(4, 48), random_chunks(1, 48, seed=1)
    weights = {}
    for on in (False, True):
        model = converted(attention=attention)
        cfg = replace(DISTILL, attention_ce_weight=attention_ce_weight, activation_checkpointing=on)
        run_stage1(model, train, heldout, cfg, tmp_path / str(on), 0, lambda r: None)
        weights[on] = {k: v.detach().clone() for k, v in trainable_attention_parameters(model).items()}
    assert_same(weights[True], weights[False])


def test_stage2_resumes_bit_identical_with_the_other_setting(tmp_path):
    """The switch changes how, not what: a run checkpointed halfway with it on ends, resumed with it off, with
    the bytes of an uninterrupted run (so a rerun may change it, e.g. to fit in memory)."""
    train, heldout = random_chunks(4, 48), random_chunks(1, 48, seed=1)
    run_stage2(with_lora(converted()), train, heldout, LORA, tmp_path / "whole", 0, lambda r: None)
    run_stage2(with_lora(converted()), train, heldout, replace(LORA, max_steps=2), tmp_path / "split", 0,
               lambda r: None)
    records: list[dict] = []
    run_stage2(with_lora(converted()), train, heldout, replace(LORA, activation_checkpointing=False),
               tmp_path / "split", 0, records.append)
    assert [r["step"] for r in records if "loss" in r] == [3, 4]  # resumed
    final = "step-00000004/weights.safetensors"
    assert (tmp_path / "split" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


def test_gradients_equal_in_every_family(family):
    """Each family's decoder layer (its own arguments: Gemma 3's two rotary tables, Mixtral's experts) and
    its stage-1 student recompute to the same gradients."""
    ids, labels = random_chunks(1, 40)[0]
    grads = {}
    for on in (False, True):
        model = with_lora(converted(family))
        with checkpointed_layers(model, on):
            stage2_loss(model, LORA)(ids, labels)[0].backward()
        grads[on] = {k: p.grad for k, p in lora_parameters(model).items()}
    assert_same(grads[True], grads[False])
    for on in (False, True):
        model = converted(family)
        transfer = AttentionTransfer(model, replace(DISTILL, activation_checkpointing=on))
        try:
            transfer.loss(ids)[0].backward()
        finally:
            transfer.close()
        grads[on] = {k: p.grad for k, p in trainable_attention_parameters(model).items()}
    assert_same(grads[True], grads[False])


# ------------------------------------------------------------------------------------------------ less memory
def test_stage2_checkpointing_holds_fewer_activations():
    """After the forward pass, with checkpointing only each decoder layer's input (and what runs outside the
    layers: embeddings, logits, loss) is held; without it every layer's activations are."""
    model = with_lora(converted(num_hidden_layers=4))
    model.train()
    ids, labels = random_chunks(1, 256)[0]
    held = {}
    for on in (False, True):
        with checkpointed_layers(model, on):
            held[on] = held_by_forward(model, lambda: next_token_loss(model, ids, labels))
    hidden = 256 * model.config.hidden_size * 4  # one layer's input, float32
    assert held[True] < held[False] / 4, held
    assert held[True] < 6 * hidden + 3 * 256 * model.config.vocab_size * 4, held  # inputs + logits and loss


def test_stage1_checkpointing_holds_fewer_activations():
    """Stage 1 holds every layer's student graph until its one backward pass; checkpointed, each keeps only q, k,
    v and the teacher's output."""
    model = converted(num_hidden_layers=4)
    ids = random_chunks(1, 256)[0][0]
    held = {}
    for on in (False, True):
        transfer = AttentionTransfer(model, replace(DISTILL, activation_checkpointing=on))
        try:
            held[on] = held_by_forward(model, lambda t=transfer: t.loss(ids)[0])
        finally:
            transfer.close()
    assert held[True] < held[False] / 3, held


def test_context_puts_the_layers_back_after_an_error():
    model = with_lora(converted())
    with pytest.raises(RuntimeError, match="boom"), checkpointed_layers(model):
        assert all("forward" in layer.__dict__ for layer in find_decoder_layers(model))
        raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in find_decoder_layers(model))


def test_eval_and_generation_are_unchanged_inside_the_context():
    model = with_lora(converted()).eval()
    ids = random_chunks(1, 24)[0][0]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        with checkpointed_layers(model):
            torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected, atol=0, rtol=0)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), out)


# ------------------------------------------------------------------------------------------------ the switch
def test_on_by_default_and_off_by_recipe():
    cfg = load_config(None, ["out_dir=out", "model.name_or_path=x"])
    assert cfg.distill.activation_checkpointing is True and cfg.lora.activation_checkpointing is True
    cfg = load_config(None, ["out_dir=out", "model.name_or_path=x", "lora.activation_checkpointing=false",
                             "distill.activation_checkpointing=false"])
    assert cfg.distill.activation_checkpointing is False and cfg.lora.activation_checkpointing is False


@pytest.mark.parametrize("section", ["distill", "lora"])
def test_bad_switch_names_the_key(section):
    with pytest.raises(TypeError, match=rf"{section}\.activation_checkpointing=1 must be of type bool"):
        load_config(None, ["out_dir=out", "model.name_or_path=x", f"{section}.activation_checkpointing=1"])
    cls = DistillConfig if section == "distill" else LoraConfig
    with pytest.raises(ValueError, match=rf"{section}\.activation_checkpointing='yes' must be true or false"):
        cls(activation_checkpointing="yes")


def test_attention_module_is_deterministic_under_recompute():
    """What checkpointing relies on: a training forward of a linearized layer without a cache writes no state and
    draws no random numbers, so running it twice gives the same output and leaves the module as it was."""
    model = converted().train()
    attn = find_decoder_layers(model)[0].self_attn
    weights, attributes = copy.deepcopy(attn.state_dict()), dict(vars(attn))
    hidden = torch.randn(2, 40, model.config.hidden_size)
    emb = model.model.rotary_emb(hidden, torch.arange(40).expand(2, -1))
    rng = torch.get_rng_state()
    first, second = attn(hidden, position_embeddings=emb)[0], attn(hidden, position_embeddings=emb)[0]
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), rng)
    assert vars(attn).keys() == attributes.keys() and all(vars(attn)[k] is v for k, v in attributes.items())
    assert all(torch.equal(weights[k], v) for k, v in attn.state_dict().items())
