"""Stage 2 distilling the original softmax model (``lora.loss: kl``), and report windows of ``data.eval_seq_len``."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny, tiny_recipe, write_recipe

from lolcats.attention import LolcatsAttention, find_decoder_layers
from lolcats.config import AttentionConfig, DistillConfig, LoraConfig, load_config
from lolcats.convert import convert_model
from lolcats.data import Chunks
from lolcats.distill import AttentionTransfer
from lolcats.finetune import add_lora, kl_loss, lora_parameters, run_stage2, stage2_loss, train_mode
from lolcats.pipeline import Run
from lolcats.teacher import kl_divergence, softmax_teacher, teacher_logits

ATTENTION = AttentionConfig(window_size=8, feature_dim=8)
LORA = LoraConfig(max_steps=6, grad_accum=1, lr=1e-3, eval_every=6, checkpoint_every=2, loss="kl")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linearized(family: str = "llama", attention: AttentionConfig = ATTENTION, lora: LoraConfig = LORA,
               seed: int = 0, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the original tiny model, a converted copy with LoRA adapters), both seeded."""
    original = build_tiny(family, seed=seed, **overrides)
    model = convert_model(copy.deepcopy(original), attention, seed=seed)
    return original, add_lora(model, lora, seed)


def perturb_adapters(model: torch.nn.Module) -> None:
    """Non-zero LoRA B weights, so that adapters left on would change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def is_linearized(model: torch.nn.Module) -> bool:
    return all(isinstance(layer.self_attn, LolcatsAttention) for layer in find_decoder_layers(model))


def random_chunks(n: int, seq_len: int, seed: int = 0, vocab: int = 128) -> Chunks:
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # a masked prompt
    return Chunks(ids, labels)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------------ the teacher
def test_teacher_is_the_original_model(family):
    original, model = linearized(family)
    perturb_adapters(model)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    student = logits(model, ids)
    with softmax_teacher(model):
        assert not is_linearized(model)
        torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=1e-5, rtol=0)
    assert is_linearized(model)
    torch.testing.assert_close(logits(model, ids), student, atol=0, rtol=0)  # adapters on again
    assert (student - logits(original, ids)).abs().max() > 1e-2


def test_teacher_context_restores_after_an_error():
    _, model = linearized()
    perturb_adapters(model)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    with pytest.raises(RuntimeError, match="inside"), softmax_teacher(model):
        raise RuntimeError("inside the teacher context")
    assert is_linearized(model)
    assert model.get_model_status().enabled is True
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


def test_teacher_needs_a_converted_model(tiny_llama):
    with pytest.raises(ValueError, match="no linearized layers"), softmax_teacher(tiny_llama):
        pass


# ------------------------------------------------------------------------------------------------ the loss
def test_kl_is_zero_when_the_window_covers_the_sequence():
    ids, labels = random_chunks(1, 32)[0]
    _, exact = linearized(attention=AttentionConfig(variant="sliding_window", window_size=64, feature_dim=8))
    loss, _ = kl_loss(exact, ids, labels)
    assert abs(loss.item()) < 1e-6
    _, hybrid = linearized()
    loss, next_token = kl_loss(hybrid, ids, labels)
    assert loss.item() > 1e-4 and next_token.item() > 0


def test_kl_counts_only_predicted_tokens():
    student, teacher = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    labels = torch.full((2, 6), -100)
    labels[0, 3] = 1  # predicted from position 2 of row 0
    got = kl_divergence(student, teacher, labels)
    t, s = teacher[0, 2].log_softmax(-1), student[0, 2].log_softmax(-1)
    assert got.item() == pytest.approx((t.exp() * (t - s)).sum().item(), rel=1e-5)
    soft = kl_divergence(student, teacher, labels, temperature=2.0)
    t, s = (teacher[0, 2] / 2).log_softmax(-1), (student[0, 2] / 2).log_softmax(-1)
    assert soft.item() == pytest.approx(4 * (t.exp() * (t - s)).sum().item(), rel=1e-5)


def test_gradient_reaches_only_lora_weights():
    _, model = linearized()
    perturb_adapters(model)  # with B = 0 no gradient would reach A
    ids, labels = random_chunks(1, 32)[0]
    loss, extra = stage2_loss(model, LORA)(ids, labels)
    loss.backward()
    assert set(extra) == {"next_token_loss"}
    lora = set(lora_parameters(model))
    assert lora and all("lora_" in name for name in lora)
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == lora
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in lora)


@pytest.mark.parametrize("family, noise", [("mixtral", {"router_jitter_noise": 0.2}),
                                           ("phimoe", {"router_jitter_noise": 0.2, "input_jitter_noise": 0.2})])
def test_stage2_routes_experts_as_at_inference(family, noise):
    """In training mode a mixture-of-experts block jitters its input and samples its routing; stage 2 trains
    LoRA (dropout on) with the frozen base deterministic, so two passes agree and equal inference."""
    _, model = linearized(family, lora=replace(LORA, dropout=0.0), **noise)
    perturb_adapters(model)
    ids = random_chunks(1, 32)[0][0]
    expected = logits(model.eval(), ids)
    model.train()  # the control: plain training mode is random here, so the test below could fail
    assert not torch.equal(logits(model, ids), logits(model, ids))
    train_mode(model)
    assert model.training and all(m.training for n, m in model.named_modules() if n.endswith("lora_dropout"))
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)


def test_stage2_with_kl_lowers_the_kl(tmp_path):
    _, model = linearized()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # sharper next-token distributions: a KL worth lowering
    train, heldout = random_chunks(4, 32), random_chunks(1, 32, seed=1)

    def mean_kl() -> float:
        return sum(kl_loss(model, *train[i])[0].item() for i in range(len(train))) / len(train)

    before = mean_kl()
    records: list[dict] = []
    result = run_stage2(model, train, heldout, replace(LORA, lr=3e-4, grad_accum=2), tmp_path / "stage2", 0,
                        records.append)
    assert result.steps == LORA.max_steps and mean_kl() < 0.8 * before
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] and all("next_token_loss" in r for r in steps)
    assert is_linearized(model) and model.get_model_status().enabled is True


def test_stage2_with_kl_resumes_bit_identical(tmp_path):
    train, heldout = random_chunks(4, 32), random_chunks(1, 32, seed=1)
    _, whole = linearized()
    run_stage2(whole, train, heldout, LORA, tmp_path / "whole", 0, lambda r: None)
    _, first = linearized()
    run_stage2(first, train, heldout, replace(LORA, max_steps=3), tmp_path / "split", 0, lambda r: None)
    _, resumed = linearized()  # as a new process: a fresh model, the step-3 checkpoint on disk
    records: list[dict] = []
    run_stage2(resumed, train, heldout, LORA, tmp_path / "split", 0, records.append)
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 6]  # it resumed, not started again
    final = "step-00000006/weights.safetensors"
    assert (tmp_path / "split" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


def test_long_sequences_train_in_both_stages():
    """Nothing assumes 1024 tokens: both stages' losses run and backpropagate at 2048."""
    _, model = linearized(max_position_embeddings=4096)
    ids, labels = random_chunks(1, 2048)[0]
    loss, _ = stage2_loss(model, LORA)(ids, labels)
    loss.backward()
    assert torch.isfinite(loss) and teacher_logits(model, ids).shape == (1, 2048, 128)
    base = convert_model(build_tiny("llama", max_position_embeddings=4096), ATTENTION, seed=0)
    transfer = AttentionTransfer(base, DistillConfig())
    try:
        mse, _ = transfer.loss(ids)
        mse.backward()
    finally:
        transfer.close()
    assert torch.isfinite(mse) and mse.item() > 0


# ------------------------------------------------------------------------------------------------ config and report
@pytest.mark.parametrize("override,key", [
    ("lora.loss=foo", "lora.loss='foo'"),
    ("lora.kl_temperature=0", "lora.kl_temperature"),
    ("lora.kl_temperature=-1.5", "lora.kl_temperature"),
    ("data.eval_seq_len=0", "data.eval_seq_len"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, ["out_dir=out", "model.name_or_path=x", override])


def test_report_windows_use_eval_seq_len(tiny_run):
    recipe, root = tiny_run
    cfg = load_config(str(write_recipe(recipe, tiny_recipe(root, **{
        "data.eval_seq_len": 48, "data.eval_in_domain": str(root / "train"), "data.eval_in_domain_filter": "1906",
        "distill.max_steps": 1, "lora.max_steps": 1, "lora.loss": "kl", "lora.grad_accum": 1}))))
    run = Run(cfg, False, None)
    assert {name: tuple(c.input_ids.shape) for name, c in run.eval_sets.items()} == {
        "in_domain": (2, 48), "out_of_domain": (2, 48)}
    assert run.train.input_ids.shape[1] == 32
    run.baselines()
    run.convert()
    run.stage1()
    run.stage2()
    report = run.finish().report.read_text()
    assert report.count("windows of 48 tokens") == 2 and "windows of 32" not in report
    records = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "stage2" and "next_token_loss" in r for r in records)


def test_heldout_report_names_the_training_length(tiny_run):
    recipe, root = tiny_run
    cfg = load_config(str(write_recipe(recipe, tiny_recipe(root, **{
        "data.eval_seq_len": 48, "distill.max_steps": 0, "lora.max_steps": 0}))))
    run = Run(cfg, False, None)
    assert tuple(run.eval_sets["in_domain"].input_ids.shape) == (2, 32)
    report = run.finish().report.read_text()
    assert "training chunks of 32 tokens" in report and "windows of 48 tokens" in report
