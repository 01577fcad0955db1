"""Safe by default: no code from a checkpoint, checked result weights, retries after a failed run,
ordinary file permissions, and older out_dirs (see also test_bad_input.py and test_faults.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_corpus, make_tiny_model_folder, tiny_recipe, write_recipe

import lolcats
from lolcats.checkpoint import CheckpointError, load
from lolcats.cli import main
from lolcats.config import load_config
from lolcats.export import export_merged
from lolcats.io import sha256_file
from lolcats.pipeline import linearize

ATT = "attention.safetensors"
ADAPTER = "adapter/adapter_model.safetensors"
EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def recipe(root: Path, **changes) -> Path:
    small = {"distill.max_steps": 2, "distill.grad_accum": 1, "lora.max_steps": 2, "lora.grad_accum": 1,
             "data.eval_windows": 1, "data.eval_out_of_domain": str(root / "train"), "report.enabled": False}
    return write_recipe(root / "recipe.yaml", tiny_recipe(root, **small, **changes))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    make_tiny_model_folder(root / "base")
    make_corpus(root / "train", docs=6, words=200)
    linearize(load_config(str(recipe(root))))
    return root


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A private copy of the finished out_dir, with its recipe."""
    shutil.copytree(finished / "out", tmp_path / "out")
    recipe_path = tmp_path / "recipe.yaml"
    data = yaml.safe_load((finished / "recipe.yaml").read_text())
    data["out_dir"] = str(tmp_path / "out")
    recipe_path.write_text(yaml.safe_dump(data))
    return tmp_path


# ---------------------------------------------------------------------------------- remote code
def test_no_code_from_a_loaded_file(tmp_path, capsys):
    """A base whose config points at its own Python (``auto_map``), and an out_dir whose record says
    ``trust_remote_code: true``: load, generate, eval, export and a rerun never run that code."""
    root = tmp_path
    make_tiny_model_folder(root / "base")
    make_corpus(root / "train", docs=6, words=200)
    marker = root / "MARKER"
    (root / "base" / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((root / "base" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (root / "base" / "config.json").write_text(json.dumps(config))
    linearize(load_config(str(recipe(root))))
    out = root / "out"
    record = json.loads((out / "lolcats_config.json").read_text())
    record["config"]["model"]["trust_remote_code"] = True  # what a downloaded out_dir could say
    (out / "lolcats_config.json").write_text(json.dumps(record))

    assert len(lolcats.linearized_layers(load(out))) == 2
    assert main(["generate", str(out), "--prompt", "the time", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "ppl", str(out), "--data", str(root / "train"), "--seq-len", "16", "--windows", "1"]) == 0
    assert main(["export", str(out), "--merge", "--to", str(root / "merged")]) == 0
    assert main(["generate", str(root / "merged"), "--prompt", "the time", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "ppl", str(root / "base"), "--data", str(root / "train"), "--seq-len", "16",
                 "--windows", "1"]) == 0
    capsys.readouterr()
    assert not marker.exists(), "code from the checkpoint ran"

    # the check could fail: asking for remote code explicitly does run the module
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_MODULES_CACHE": str(root / "hf" / "modules")}
    subprocess.run([sys.executable, "-m", "lolcats.cli", "generate", str(root / "base"), "--prompt", "hi",
                    "--max-new-tokens", "1", "--trust-remote-code"], env=env, capture_output=True, timeout=300)
    assert marker.exists()


def test_no_loader_reads_trust_remote_code_from_a_record():
    """Static check: only the caller's argument or a recipe's ModelConfig reach trust_remote_code."""
    src = Path(lolcats.__file__).parent
    for path in src.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "trust_remote_code" in line and ("record[" in line or "record.get" in line):
                raise AssertionError(f"{path}:{n} reads trust_remote_code from a loaded record: {line.strip()}")


# ---------------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("name", [ATT, ADAPTER])
@pytest.mark.parametrize("where", [0, 8, "middle", -1], ids=["first", "header", "middle", "last"])
def test_flipped_byte_is_detected_by_load_export_and_rerun(run_copy, name, where):
    out = run_copy / "out"
    path = out / name
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if where == "middle" else where
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    record_before = (out / "lolcats_config.json").read_bytes()
    with pytest.raises(CheckpointError, match=rf"{Path(name).name} has changed since lolcats wrote it"):
        load(out)
    with pytest.raises(CheckpointError, match=rf"{Path(name).name} has changed"):
        export_merged(out, run_copy / "merged")
    assert not (run_copy / "merged").exists()
    with pytest.raises(CheckpointError, match=rf"{Path(name).name} has changed"):
        linearize(load_config(str(run_copy / "recipe.yaml")))
    assert (out / "lolcats_config.json").read_bytes() == record_before  # the rerun wrote nothing


def test_export_records_checksums_and_verify_checks_them(run_copy, capsys):
    assert main(["export", str(run_copy / "out"), "--merge", "--to", str(run_copy / "merged")]) == 0
    record = json.loads((run_copy / "merged" / "lolcats_config.json").read_text())
    assert record["merged"] and "model.safetensors" in record["files"]
    assert record["files"]["model.safetensors"] == sha256_file(run_copy / "merged" / "model.safetensors")
    capsys.readouterr()
    assert main(["verify", str(run_copy / "merged")]) == 0
    assert f"all {len(record['files'])} files match" in capsys.readouterr().out
    assert main(["verify", str(run_copy / "out")]) == 0  # an out_dir verifies its result files too
    load(run_copy / "merged", verify=True)


# ---------------------------------------------------------------------------------- retries
def test_failed_run_can_be_retried_without_overwrite(tmp_path, capsys):
    """Bad data stops the run before anything is written; the corrected rerun just runs."""
    make_tiny_model_folder(tmp_path / "base")
    make_corpus(tmp_path / "train", docs=6, words=200)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the time"}\n[1, 2]\n')
    path = recipe(tmp_path, **{"data.train": str(bad)})
    assert main(["linearize", str(path)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    path = recipe(tmp_path)
    assert main(["linearize", str(path)]) == 0
    assert json.loads((tmp_path / "out" / "lolcats_config.json").read_text())["status"] == "complete"


def test_run_stopped_before_its_first_step_may_be_reconfigured(tmp_path, capsys):
    make_tiny_model_folder(tmp_path / "base")
    make_corpus(tmp_path / "train", docs=6, words=200)
    entry = Path(__file__).with_name("fault_entry.py")
    proc = subprocess.run([sys.executable, str(entry), "kill", "stage1:micro0", "--", "linearize",
                           str(recipe(tmp_path))], capture_output=True, timeout=300)
    assert proc.returncode == -9
    assert json.loads((tmp_path / "out" / "lolcats_config.json").read_text())["status"] == "running"
    assert main(["linearize", str(recipe(tmp_path, **{"distill.lr": 0.02}))]) == 0
    record = json.loads((tmp_path / "out" / "lolcats_config.json").read_text())
    assert record["status"] == "complete" and record["config"]["distill"]["lr"] == 0.02
    # once a step has finished, another config is refused
    capsys.readouterr()
    assert main(["linearize", str(recipe(tmp_path, **{"distill.lr": 0.03}))]) == 2
    assert "another config (differs in distill.lr)" in capsys.readouterr().err


def test_files_honour_the_umask(tmp_path):
    make_tiny_model_folder(tmp_path / "base")
    make_corpus(tmp_path / "train", docs=6, words=200)
    old = os.umask(0o027)
    try:
        linearize(load_config(str(recipe(tmp_path))))
        export_merged(tmp_path / "out", tmp_path / "merged")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for f in (out / ATT, out / ADAPTER, out / "lolcats_config.json", tmp_path / "merged" / "model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o640, f"{f} has mode {oct(f.stat().st_mode & 0o777)}"
    for d in (out / "adapter", tmp_path / "merged"):
        assert d.stat().st_mode & 0o777 == 0o750, d


# ---------------------------------------------------------------------------------- older out_dirs
def test_format_1_out_dir_loads_but_is_not_resumed(run_copy, capsys):
    out = run_copy / "out"
    record = json.loads((out / "lolcats_config.json").read_text())
    expected = load(out)
    old = {k: v for k, v in record.items() if k not in ("format", "files")} | {"format_version": 1}
    old["base_model"].pop("config_sha256")
    (out / "lolcats_config.json").write_text(json.dumps(old))
    import torch

    x = torch.randint(3, 40, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(input_ids=x).logits, expected(input_ids=x).logits, atol=0, rtol=0)
    assert main(["linearize", str(run_copy / "recipe.yaml")]) == 2
    assert "older lolcats (format 1" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 2
    assert "records no checksums" in capsys.readouterr().err


CHECKPOINTING = (("distill", ("activation_checkpointing",)), ("lora", ("activation_checkpointing",)))
NEWER_KEYS = {  # keys each format's records lack (options added since)
    4: (("attention", ("sparse_cache_training",)), *CHECKPOINTING),
    3: (("attention", ("sparse_cache", "sparse_cache_training", "softmax_layers", "softmax_criterion",
                       "skip_layers_chosen")), *CHECKPOINTING),
    2: (("attention", ("sparse_cache", "sparse_cache_training", "softmax_layers", "softmax_criterion",
                       "skip_layers_chosen", "sink_tokens", "decay", "decay_init")),
        ("lora", ("loss", "kl_temperature", "activation_checkpointing")), ("distill", ("activation_checkpointing",))),
}


@pytest.mark.parametrize("version", [2, 3, 4])
def test_older_out_dir_loads_and_resumes(run_copy, capsys, version):
    """A format-2 record (before sinks and decay), a format-3 record (before softmax layers chosen from data and
    the sparse cache) or a format-4 one (before ``sparse_cache_training``, some before activation checkpointing)
    has none of the newer keys: it
    loads as it was and a rerun of the same recipe resumes it (finished, nothing retrained) instead of calling it
    another config."""
    out = run_copy / "out"
    record = json.loads((out / "lolcats_config.json").read_text())
    expected = load(out)
    old = record | {"format_version": version}
    for section, keys in NEWER_KEYS[version]:
        for key in keys:
            old["config"][section].pop(key)
    (out / "lolcats_config.json").write_text(json.dumps(old))
    import torch

    x = torch.randint(3, 40, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(input_ids=x).logits, expected(input_ids=x).logits, atol=0, rtol=0)
    attention = (out / ATT).read_bytes()
    assert main(["linearize", str(run_copy / "recipe.yaml")]) == 0, capsys.readouterr().err
    assert (out / ATT).read_bytes() == attention
    assert json.loads((out / "lolcats_config.json").read_text())["format_version"] == 5


def test_activation_checkpointing_may_change_on_resume(run_copy, capsys):
    """How a stage computes is not part of the config a rerun must share: a run recorded with checkpointing off
    resumes under a recipe with it on (the same weights either way: tests/test_activation_checkpointing.py)."""
    out = run_copy / "out"
    record = json.loads((out / "lolcats_config.json").read_text())
    assert record["config"]["lora"]["activation_checkpointing"] is True  # the default
    for section in ("distill", "lora"):
        record["config"][section]["activation_checkpointing"] = False
    (out / "lolcats_config.json").write_text(json.dumps(record))
    attention = (out / ATT).read_bytes()
    assert main(["linearize", str(run_copy / "recipe.yaml")]) == 0, capsys.readouterr().err
    assert (out / ATT).read_bytes() == attention
    data = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    data["lora"]["max_steps"] = 3  # a setting that does change what is computed is still refused
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert main(["linearize", str(run_copy / "recipe.yaml")]) == 2
    assert "differs in lora.max_steps" in capsys.readouterr().err
