"""``lolcats linearize`` end to end on a tiny local model: out_dir, load, export, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_tiny_model_folder

import lolcats
from lolcats.checkpoint import CheckpointError, load
from lolcats.cli import main
from lolcats.config import load_config
from lolcats.export import export_merged
from lolcats.pipeline import linearize

EXPECTED_FILES = {"report.md", "attention_mse.png", "attention.safetensors", "adapter", "lolcats_config.json",
                  "metrics.jsonl", "train_state"}


def logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, 40, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.fixture
def finished(tiny_run):
    recipe, root = tiny_run
    result = linearize(load_config(str(recipe)))
    return result, root


def test_out_dir_layout_and_report(finished):
    result, root = finished
    out = root / "out"
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    record = json.loads((out / "lolcats_config.json").read_text())
    assert record["status"] == "complete" and record["format_version"] == 5 and record["format"] == "lolcats-out-dir"
    from lolcats.io import sha256_file

    assert record["files"] == {name: sha256_file(out / name)
                               for name in ("attention.safetensors", "adapter/adapter_model.safetensors")}
    assert len(record["base_model"]["fingerprint"]) == 64
    assert record["versions"]["transformers"].startswith("5.")
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    report = (out / "report.md").read_text()
    for row in ("original", "sliding window only", "before training", "after stage 1", "after stage 2"):
        assert row in report
    assert "in-domain ppl" in result.table
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("stage") == "stage1" and "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in steps if r.get("stage") == "stage2" and "loss" in r] == [1, 2, 3]


def test_load_reproduces_trained_logits_exactly(finished):
    result, root = finished
    reloaded = load(root / "out")
    torch.testing.assert_close(logits(reloaded), logits(result.model), atol=0, rtol=0)


def test_load_on_other_base_fails_naming_both(finished):
    _, root = finished
    make_tiny_model_folder(root / "other", seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match=r"base model mismatch: .* trained on .*base.* but .*other"):
        load(root / "out", base=str(root / "other"))


def test_export_merge_loads_without_base(finished):
    result, root = finished
    dest = export_merged(root / "out", root / "merged")
    expected = logits(result.model)
    (root / "base").rename(root / "base-moved")  # the export must not need the base
    merged = load(dest)
    assert not hasattr(merged, "peft_config")
    assert len(lolcats.linearized_layers(merged)) == 2
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_finished_stages_are_not_redone(finished):
    result, root = finished
    before = (root / "out" / "attention.safetensors").read_bytes()
    n_lines = len((root / "out" / "metrics.jsonl").read_text().splitlines())
    again = linearize(load_config(str(root / "recipe.yaml")))
    assert (root / "out" / "attention.safetensors").read_bytes() == before
    lines = (root / "out" / "metrics.jsonl").read_text().splitlines()[n_lines:]
    assert not any("loss" in json.loads(line) for line in lines), "no training step ran again"
    torch.testing.assert_close(logits(again.model), logits(result.model), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ bad input
def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def _edit(recipe, **sections):
    data = yaml.safe_load(recipe.read_text())
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    recipe.write_text(yaml.safe_dump(data))


def assert_not_complete(out):
    if out.exists():
        assert not (out / "report.md").exists()
        record = json.loads((out / "lolcats_config.json").read_text()) if (out / "lolcats_config.json").exists() else {}
        assert record.get("status") != "complete"


def test_missing_model_path(tiny_run, capsys):
    recipe, root = tiny_run
    code, err = run_cli(capsys, "linearize", recipe, f"model.name_or_path={root}/nope")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (root / "out").exists()


def test_unsupported_architecture(tiny_run, capsys):
    import transformers

    recipe, root = tiny_run
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)
                                 ).save_pretrained(root / "gpt2")
    code, err = run_cli(capsys, "linearize", recipe, f"model.name_or_path={root}/gpt2")
    assert code == 2 and "unsupported architecture GPT2LMHeadModel" in err and "llama" in err
    assert not (root / "out").exists()


@pytest.mark.parametrize("override,message", [
    ("distill.max_stepz=3", "unknown key 'max_stepz' in distill; valid keys: "),
    ("distill.max_steps=many", "distill.max_steps='many' must be of type int"),
    ("attention.variant=quadratic", "attention.variant='quadratic' is not valid"),
])
def test_bad_recipe_values(tiny_run, capsys, override, message):
    recipe, root = tiny_run
    code, err = run_cli(capsys, "linearize", recipe, override)
    assert code == 2 and message in err
    assert not (root / "out").exists()


def test_out_dir_of_other_base_or_config_is_refused(finished, capsys):
    _, root = finished
    recipe = root / "recipe.yaml"
    make_tiny_model_folder(root / "other", seed=1)
    before = (root / "out" / "attention.safetensors").read_bytes()
    code, err = run_cli(capsys, "linearize", recipe, f"model.name_or_path={root}/other")
    assert code == 2 and "another base model" in err and "--overwrite" in err
    code, err = run_cli(capsys, "linearize", recipe, "distill.lr=0.5")
    assert code == 2 and "another config (differs in distill.lr)" in err
    assert (root / "out" / "attention.safetensors").read_bytes() == before
    code, err = run_cli(capsys, "linearize", recipe, "distill.lr=0.5", "--overwrite")
    assert code == 0
    assert json.loads((root / "out" / "lolcats_config.json").read_text())["config"]["distill"]["lr"] == 0.5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, capsys):
    recipe, root = tiny_run
    from lolcats.io import set_fault_hook

    set_fault_hook(lambda key: key == "stage1:micro5:loss")  # optimizer step 3, micro-step 5
    try:
        code, err = run_cli(capsys, "linearize", recipe)
    finally:
        set_fault_hook(None)
    assert code == 2
    assert "stage1: loss became nan at optimizer step 3 (micro-step 5)" in err
    assert "last good checkpoint is step 2" in err
    assert (root / "out" / "train_state" / "stage1" / "step-00000002").is_dir()
    assert_not_complete(root / "out")
    code, _ = run_cli(capsys, "linearize", recipe)  # resumes from step 2 and finishes
    assert code == 0 and (root / "out" / "report.md").exists()


def test_data_too_short_for_one_chunk(tiny_run, capsys):
    recipe, root = tiny_run
    code, err = run_cli(capsys, "linearize", recipe, "data.seq_len=100000")
    assert code == 2 and "fewer than one chunk of data.seq_len=100000" in err
    assert_not_complete(root / "out")


# ------------------------------------------------------------------------------------------ generate CLI
def test_generate_cli_from_out_dir(finished, capsys):
    _, root = finished
    code = main(["generate", str(root / "out"), "--prompt", "the time of", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("the time of")


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "the " * 600, "--max-new-tokens", "10"], "past the model's position limit of 512"),
])
def test_generate_bad_prompts(finished, capsys, args, message):
    _, root = finished
    code, err = run_cli(capsys, "generate", root / "out", *args)
    assert code == 2 and message in err


def test_generate_missing_model(tmp_path, capsys):
    code, err = run_cli(capsys, "generate", tmp_path / "missing", "--prompt", "hi")
    assert code == 2 and "does not exist" in err


def test_eval_ppl_cli(finished, capsys):
    _, root = finished
    code = main(["eval", "ppl", str(root / "out"), "--data", str(root / "ood"), "--seq-len", "16", "--windows", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "over 2 windows of 16 tokens" in out
    assert float(out.split()[1]) > 1
