"""Bad input and damaged files, as a new user meets them: every case stops with exit code 2 and one line
``error: …`` naming the key or the file (and no traceback), changes nothing outside the out_dir it was
given (the asset cache aside), and leaves nothing there that looks complete.

Cases are grouped by the defect they guard against (see each group's comment)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, make_tiny_model_folder, tiny_recipe, write_recipe
from safetensors.torch import load_file, save_file

from lolcats.cli import main
from lolcats.config import load_config
from lolcats.io import sha256_file
from lolcats.pipeline import linearize

ATT = "attention.safetensors"
ADAPTER = "adapter/adapter_model.safetensors"


SMALL = {"distill.max_steps": 2, "distill.grad_accum": 1, "lora.max_steps": 2, "lora.grad_accum": 1,
         "data.eval_windows": 1, "report.enabled": False}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished tiny run (base, corpora, out_dir), copied into each case that needs one."""
    root = tmp_path_factory.mktemp("finished")
    make_tiny_model_folder(root / "base")
    make_corpus(root / "train", docs=6, words=200)
    make_corpus(root / "ood", docs=1, words=200, seed=100)
    write_recipe(root / "recipe.yaml", tiny_recipe(root, **SMALL))
    linearize(load_config(str(root / "recipe.yaml")))
    return root


@dataclass
class World:
    """A user's folder: a tiny base model, corpora, a recipe, a folder of their own files."""

    root: Path
    shared: Path  # the module's finished run (base model + out_dir)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def write_recipe(self, **changes) -> Path:
        return write_recipe(self.recipe, tiny_recipe(self.shared, self.out, **SMALL, **changes))

    def finished(self, name: str = "finished") -> Path:
        """A copy of the finished out_dir in this world."""
        dest = self.root / name
        shutil.copytree(self.shared / "out", dest)
        return dest


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_tensors(out: Path, name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change a result file's tensors and re-record its sha256, as if training itself had produced them."""
    tensors = load_file(str(out / name))
    change(tensors)
    save_file(tensors, str(out / name))
    rerecord(out, name)


def rerecord(out: Path, name: str) -> None:
    """Record a result file's current sha256 in the run record (and its stage's DONE marker)."""
    record = json.loads((out / "lolcats_config.json").read_text())
    record["files"][name] = sha256_file(out / name)
    (out / "lolcats_config.json").write_text(json.dumps(record))


def set_first(tensors: dict[str, torch.Tensor], value: float, key_part: str = "") -> None:
    name = sorted(k for k in tensors if key_part in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unwritable_dir(w: World) -> Path:
    """A folder this process cannot write to (root ignores mode bits, so it gets a read-only /proc/sys)."""
    if os.geteuid() != 0:
        d = w.root / "readonly"
        d.mkdir()
        d.chmod(0o500)
        return d
    return Path("/proc/sys")


# ----------------------------------------------------------------------------------------------- cases
# Each case: (id, build(world) -> (argv, out_dir or None), text the one-line message must hold).
Build = Callable[[World], tuple[list, Path | None]]
CASES: list[tuple[str, Build, str]] = []


def case(name: str, expect: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append((name, build, expect))
        return build
    return register


def linearize_args(w: World, *overrides: str, overwrite: bool = False) -> list:
    return ["linearize", w.write_recipe() if not w.recipe.exists() else w.recipe, *overrides,
            *(["--overwrite"] if overwrite else [])]


# 1. --overwrite deletes only a lolcats run, never the user's files or a folder that holds them
@case("overwrite-user-folder", "--overwrite deletes only a folder holding a lolcats run")
def _(w):
    user = w.root / "user"
    return linearize_args(w, f"out_dir={user}", overwrite=True), None


@case("overwrite-empty-out-dir", "out_dir='' is empty")
def _(w):
    return linearize_args(w, "out_dir=", overwrite=True), None


@case("empty-out-dir-without-overwrite", "out_dir='' is empty")
def _(w):
    return linearize_args(w, "out_dir="), None


@case("overwrite-dot", "would delete the current folder")
def _(w):
    return linearize_args(w, "out_dir=.", overwrite=True), None


@case("overwrite-parent-of-cwd", "--overwrite refuses to delete out_dir ..: it is")
def _(w):
    return linearize_args(w, "out_dir=..", overwrite=True), None


@case("overwrite-root", "it is the file-system root")
def _(w):
    return linearize_args(w, "out_dir=/", overwrite=True), None


@case("overwrite-home", "it is your home folder")
def _(w):
    return linearize_args(w, f"out_dir={w.root / 'home'}", overwrite=True), None


@case("overwrite-above-home", "it is your home folder or holds it")
def _(w):
    (w.root / "home" / "deeper").mkdir()
    os.environ["HOME"] = str(w.root / "home" / "deeper")
    return linearize_args(w, f"out_dir={w.root / 'home'}", overwrite=True), None


@case("overwrite-git-repository", "it is a git repository")
def _(w):
    repo = w.root / "project"
    (repo / ".git").mkdir(parents=True)
    (repo / "lolcats_config.json").write_text(json.dumps({"format": "lolcats-out-dir", "format_version": 2,
                                                          "config": {}, "base_model": {}}))
    return linearize_args(w, f"out_dir={repo}", overwrite=True), None


@case("overwrite-garbage-record", "--overwrite deletes only a folder holding a lolcats run")
def _(w):
    d = w.root / "notes"
    d.mkdir()
    (d / "lolcats_config.json").write_text("my notes, not json")
    return linearize_args(w, f"out_dir={d}", overwrite=True), None


@case("overwrite-record-without-marker", "--overwrite deletes only a folder holding a lolcats run")
def _(w):
    d = w.root / "lookalike"
    d.mkdir()
    (d / "lolcats_config.json").write_text(json.dumps({"format_version": 2, "config": {}, "base_model": {}}))
    (d / "thesis.tex").write_text("precious")
    return linearize_args(w, f"out_dir={d}", overwrite=True), None


@case("not-empty-not-a-run", "is not empty and holds no lolcats run")
def _(w):
    return linearize_args(w, f"out_dir={w.root / 'user'}"), None


# 3. result weights are checked: a changed byte, a missing file, non-finite values
for _pos_name, _pos in (("header", 9), ("data", -1)):
    def _make(pos_name: str, pos: int):
        @case(f"rerun-flipped-attention-{pos_name}", ATT)
        def _(w):
            out = w.finished()
            flip(out / ATT, pos)
            return ["linearize", w.write_recipe(out_dir=str(out))], None

        @case(f"rerun-flipped-adapter-{pos_name}", ADAPTER)
        def _(w):
            out = w.finished()
            flip(out / ADAPTER, pos)
            return ["linearize", w.write_recipe(out_dir=str(out))], None
    _make(_pos_name, _pos)


@case("generate-flipped-attention", "attention.safetensors has changed since lolcats wrote it")
def _(w):
    out = w.finished()
    flip(out / ATT, -3)
    return ["generate", out, "--prompt", "the time"], None


@case("eval-ppl-flipped-adapter", "adapter_model.safetensors has changed since lolcats wrote it")
def _(w):
    out = w.finished()
    flip(out / ADAPTER, -5)
    return ["eval", "ppl", out, "--data", w.shared / "ood", "--seq-len", "16"], None


@case("export-flipped-attention", "attention.safetensors has changed")
def _(w):
    out = w.finished()
    flip(out / ATT, 100)
    return ["export", out, "--merge", "--to", w.root / "merged"], w.root / "merged"


@case("attention-deleted", "attention.safetensors is missing")
def _(w):
    out = w.finished()
    (out / ATT).unlink()
    return ["generate", out, "--prompt", "the time"], None


@case("attention-infinite-window-factor", "holds non-finite values")
def _(w):
    out = w.finished()
    rewrite_tensors(out, ATT, lambda t: set_first(t, float("inf"), "window_factor"))
    return ["generate", out, "--prompt", "the time"], None


@case("adapter-nan", "holds non-finite values")
def _(w):
    out = w.finished()
    rewrite_tensors(out, ADAPTER, lambda t: set_first(t, float("nan")))
    return ["export", out, "--merge", "--to", w.root / "merged"], w.root / "merged"


@case("attention-wrong-shape", "has shape")
def _(w):
    out = w.finished()

    def shrink(t):
        name = sorted(t)[0]
        t[name] = t[name][..., :-1].contiguous()
    rewrite_tensors(out, ATT, shrink)
    return ["generate", out, "--prompt", "the time"], None


@case("verify-export-flipped", "model.safetensors has changed")
def _(w):
    assert main(["export", str(w.finished()), "--merge", "--to", str(w.root / "merged")]) == 0
    flip(w.root / "merged" / "model.safetensors", -7)
    return ["verify", w.root / "merged"], None


@case("verify-not-a-run", "has no lolcats_config.json")
def _(w):
    return ["verify", w.root / "user"], None


# 5. one line instead of a traceback
@case("recipe-yaml-syntax", "recipe.yaml is not valid YAML at line 3")
def _(w):
    w.recipe.write_text("out_dir: out\nmodel: {name_or_path: [unclosed\n")
    return ["linearize", w.recipe], None


@case("override-yaml-syntax", "override 'distill.lr=[1,' is not valid YAML")
def _(w):
    return linearize_args(w, "distill.lr=[1,"), None


@case("model-config-without-weights", "could not be read")
def _(w):
    base = w.root / "noweights"
    shutil.copytree(w.shared / "base", base)
    (base / "model.safetensors").unlink()
    return linearize_args(w, f"model.name_or_path={base}"), None


@case("model-weights-truncated", "model.safetensors")
def _(w):
    base = w.root / "truncated"
    shutil.copytree(w.shared / "base", base)
    truncate(base / "model.safetensors")
    return linearize_args(w, f"model.name_or_path={base}"), None


@case("model-weights-garbage", "could not be read")
def _(w):
    base = w.root / "garbage"
    shutil.copytree(w.shared / "base", base)
    (base / "model.safetensors").write_bytes(b"\xff" * 64)
    return linearize_args(w, f"model.name_or_path={base}"), None


@case("model-config-garbage", "config.json")
def _(w):
    base = w.root / "badconfig"
    shutil.copytree(w.shared / "base", base)
    (base / "config.json").write_text("{ not json")
    return linearize_args(w, f"model.name_or_path={base}"), None


@case("attention-truncated", "attention.safetensors is not a readable safetensors file")
def _(w):
    out = w.finished()
    truncate(out / ATT)
    rerecord(out, ATT)
    return ["generate", out, "--prompt", "the time"], None


@case("adapter-truncated", "adapter_model.safetensors is not a readable safetensors file")
def _(w):
    out = w.finished()
    truncate(out / ADAPTER)
    rerecord(out, ADAPTER)
    return ["eval", "ppl", out, "--data", w.shared / "ood", "--seq-len", "16"], None


@case("out-dir-is-a-file", "is an existing file")
def _(w):
    (w.root / "results.txt").write_text("my results")
    return linearize_args(w, f"out_dir={w.root / 'results.txt'}"), None


@case("out-dir-under-a-file", "cannot be written")
def _(w):
    (w.root / "results.txt").write_text("my results")
    return linearize_args(w, f"out_dir={w.root / 'results.txt' / 'run'}"), None


@case("out-dir-unwritable-parent", "cannot be written")
def _(w):
    return linearize_args(w, f"out_dir={unwritable_dir(w) / 'lolcats-run'}"), None


@case("export-to-existing-file", "is an existing file")
def _(w):
    out = w.finished()
    (w.root / "model.bin").write_text("mine")
    return ["export", out, "--merge", "--to", w.root / "model.bin"], None


@case("export-to-non-empty-folder", "exists and is not empty")
def _(w):
    return ["export", w.finished(), "--merge", "--to", w.root / "user"], None


@case("export-unfinished-run", "unfinished run")
def _(w):
    out = w.finished()
    record = json.loads((out / "lolcats_config.json").read_text())
    record["status"] = "running"
    (out / "lolcats_config.json").write_text(json.dumps(record))
    return ["export", out, "--merge", "--to", w.root / "merged"], w.root / "merged"


@case("eval-ppl-seq-len-0", "argument --seq-len: 0 must be a positive whole number")
def _(w):
    return ["eval", "ppl", w.shared / "base", "--seq-len", "0"], None


@case("eval-ppl-window-on-linearized", "is linearized")
def _(w):
    return ["eval", "ppl", w.finished(), "--data", w.shared / "ood", "--seq-len", "16", "--window", "4"], None


# 6. values checked where they are read, naming the key or the flag
for _key, _value in (("distill.lr", ".nan"), ("distill.lr", "-0.01"), ("lora.lr", ".nan"), ("lora.lr", "-1e-4"),
                     ("lora.lr", "0"), ("distill.weight_decay", "-1"), ("lora.alpha", "0"),
                     ("distill.max_grad_norm", ".inf"), ("distill.min_lr", "-1"), ("distill.plateau_factor", "2"),
                     ("lora.max_grad_norm", "-.inf"), ("distill.mse_scale", "-1000")):
    def _make(key: str, value: str):
        @case(f"{key}={value}", f"{key}=")
        def _(w):
            return linearize_args(w, f"{key}={value}"), None
    _make(_key, _value)

for _key, _value, _expect in (("threads", "-2", "threads=-2 must be a non-negative integer"),
                              ("seed", "-1", "seed=-1 must be a non-negative integer"),
                              ("data.seq_len", "0", "data.seq_len=0 must be a positive integer"),
                              ("attention.window_size", "0", "attention.window_size=0"),
                              ("distill.grad_accum", "0", "distill.grad_accum=0"),
                              ("lora.dropout", "1.5", "lora.dropout=1.5"),
                              ("model.dtype", "float8", "model.dtype='float8' is not valid"),
                              ("report.baseline_sinks", "-1", "report.baseline_sinks=-1 must be a non-negative"),
                              ("report.passkey_lengths", "[0]", "report.passkey_lengths[0]=0 must be a positive"),
                              ("report.long_context_seq_len", "0", "report.long_context_seq_len=0")):
    def _make(key: str, value: str, expect: str):
        @case(f"{key}={value}", expect)
        def _(w):
            return linearize_args(w, f"{key}={value}"), None
    _make(_key, _value, _expect)

for _argv, _expect in (
    (["blockwise", "plan", "{recipe}", "--tokens", "-5"], "argument --tokens: -5 must be a positive whole number"),
    (["eval", "ppl", "{base}", "--windows", "0"], "argument --windows: 0 must be a positive whole number"),
    (["eval", "ppl", "{base}", "--seq-len", "many"], "argument --seq-len: 'many' is not a whole number"),
    (["eval", "ppl", "{base}", "--sinks", "4"], "--sinks 4 needs --window"),
    (["eval", "ppl", "{base}", "--window", "0"], "argument --window: 0 must be a positive whole number"),
    (["eval", "ppl", "{base}", "--window", "8", "--sinks", "-1"], "argument --sinks: -1 must be 0 or more"),
    (["generate", "{base}", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["generate", "{base}", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: 1.5 must be between 0 and 1"),
    (["generate", "{base}", "--prompt", "hi", "--temperature", "0"], "argument --temperature: 0.0 must be greater"),
    (["eval", "passkey", "{base}", "--trials", "0"], "argument --trials"),
    (["eval", "passkey", "{base}", "--depths", "1.5"], "argument --depths"),
    (["eval", "mmlu", "{base}", "--batch-size", "0"], "argument --batch-size"),
    (["eval", "mmlu", "{base}", "--shots", "9"], "--shots must be between 0 and 5"),
    (["blockwise", "train", "{recipe}", "--blocks", "-1"], "argument --blocks: -1 must be 0 or more"),
):
    def _make(argv: list[str], expect: str):
        @case(" ".join(argv[:2] + argv[3:]).replace("{", "").replace("}", ""), expect)
        def _(w):
            recipe = w.write_recipe()
            return [a.format(recipe=recipe, base=w.shared / "base") for a in argv], None
    _make(_argv, _expect)


# 7. a recipe names at least the model and out_dir
for _name, _content, _expect in (
    ("empty-recipe", "", "does not name out_dir and model.name_or_path"),
    ("recipe-comments-only", "# nothing yet\n", "does not name out_dir and model.name_or_path"),
    ("recipe-without-model", "out_dir: out\n", "does not name model.name_or_path"),
    ("recipe-without-out-dir", "model: {name_or_path: base}\n", "does not name out_dir"),
    ("recipe-is-a-list", "- out_dir: out\n", "must be a YAML mapping"),
):
    def _make(name: str, content: str, expect: str):
        @case(name, expect)
        def _(w):
            w.recipe.write_text(content)
            return ["linearize", w.recipe], None
    _make(_name, _content, _expect)


# 8. messages that name the file and the fix
@case("truncated-gguf", "small.gguf could not be read")
def _(w):
    gguf = w.root / "small.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    return ["generate", gguf, "--prompt", "hi"], None


@case("garbage-run-record-rerun", "lolcats_config.json is not valid JSON")
def _(w):
    out = w.finished()
    (out / "lolcats_config.json").write_text("{ garbage")
    return ["linearize", w.write_recipe(out_dir=str(out))], None


@case("garbage-run-record-generate", "lolcats_config.json is not valid JSON")
def _(w):
    out = w.finished()
    (out / "lolcats_config.json").write_bytes(b"\x00\xff\xfe")
    return ["generate", out, "--prompt", "hi"], None


@case("run-record-future-version", "format version 99")
def _(w):
    out = w.finished()
    record = json.loads((out / "lolcats_config.json").read_text())
    (out / "lolcats_config.json").write_text(json.dumps({**record, "format_version": 99}))
    return ["generate", out, "--prompt", "hi"], None


@case("run-record-damaged-config", "its config is not one this lolcats reads")
def _(w):
    out = w.finished()
    record = json.loads((out / "lolcats_config.json").read_text())
    record["config"]["attention"]["variant"] = "quadratic"
    (out / "lolcats_config.json").write_text(json.dumps(record))
    return ["generate", out, "--prompt", "hi"], None


def _data_case(name: str, filename: str, content: bytes, expect: str) -> None:
    @case(name, expect)
    def _(w):
        d = w.root / "data"
        d.mkdir()
        (d / filename).write_bytes(content)
        return linearize_args(w, f"data.train={d / filename}"), None


_data_case("binary-training-file", "corpus.txt", bytes(range(256)) * 8, "corpus.txt is not UTF-8 text")
_data_case("nul-bytes-training-file", "corpus.txt", b"text\x00\x00\x00more", "corpus.txt holds NUL bytes")
_data_case("jsonl-line-is-a-list", "train.jsonl", b'{"text": "the time"}\n[1, 2, 3]\n', "train.jsonl:2: expected a JSON object")
_data_case("jsonl-line-is-a-string", "train.jsonl", b'"just a string"\n', "train.jsonl:1: expected a JSON object")
_data_case("csv-given-as-jsonl", "train.jsonl", b"instruction,output\nsay hi,hi\n", "train.jsonl:1: not valid JSON")
_data_case("csv-file", "train.csv", b"instruction,output\nsay hi,hi\n", "unsupported file type '.csv'")
_data_case("jsonl-record-without-text", "train.jsonl", b'{"title": "x"}\n', "a record needs 'text'")
_data_case("json-not-a-list", "train.json", b'{"text": "x"}', "train.json: expected a JSON list of records")
_data_case("json-syntax", "train.json", b'[{"text": "x"', "train.json: not valid JSON")


@case("binary-recipe", "is not a text file")
def _(w):
    w.recipe.write_bytes(b"\xff\xfe\x00\x01" * 10)
    return ["linearize", w.recipe], None


@case("override-without-equals", "must look like key=value")
def _(w):
    return linearize_args(w, "distill.max_steps"), None


@case("override-empty-key", "has an empty key")
def _(w):
    return linearize_args(w, "distill..lr=1"), None


@case("missing-training-data", "does not exist")
def _(w):
    return linearize_args(w, f"data.train={w.root / 'nope'}"), None


@case("missing-eval-data", "does not exist")
def _(w):
    return linearize_args(w, f"data.eval_out_of_domain={w.root / 'nope'}", "report.enabled=true"), None


@case("blockwise-train-unknown-block", "block 99 does not exist")
def _(w):
    return ["blockwise", "train", w.write_recipe(), "--blocks", "99"], None


@case("verify-garbage-record", "lolcats_config.json is not valid JSON")
def _(w):
    d = w.root / "exported"
    d.mkdir()
    (d / "lolcats_config.json").write_text("[")
    return ["verify", d], None


@case("lora-loss-unknown", "lora.loss='foo' is not valid")
def _(w):
    return linearize_args(w, "lora.loss=foo"), None


@case("lora-kl-temperature-zero", "lora.kl_temperature=0.0 must be a finite number > 0")
def _(w):
    return linearize_args(w, "lora.loss=kl", "lora.kl_temperature=0"), None


@case("position-offset-negative", "data.max_position_offset=-1 must be a non-negative integer")
def _(w):
    return linearize_args(w, "data.max_position_offset=-1"), None


@case("position-offset-past-limit", "data.max_position_offset=100000 + data.seq_len=32 is past the model's")
def _(w):
    return linearize_args(w, "data.max_position_offset=100000"), None


@case("sink-tokens-negative", "attention.sink_tokens=-2 must be a non-negative integer")
def _(w):
    return linearize_args(w, "attention.sink_tokens=-2"), None


@case("decay-init-one", "attention.decay_init=1.0 must be a number strictly between 0 and 1")
def _(w):
    return linearize_args(w, "attention.decay_init=1.0"), None


@case("eval-seq-len-zero", "data.eval_seq_len=0 must be a positive integer")
def _(w):
    return linearize_args(w, "data.eval_seq_len=0"), None


@case("eval-seq-len-longer-than-eval-data", "shorter than one window of data.eval_seq_len=100000")
def _(w):
    return linearize_args(w, "report.enabled=true", "data.eval_seq_len=100000"), None


# ----------------------------------------------------------------------------------------------- the test
def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple]:
    """Every file and folder under ``root`` (content hash for files) except ``skip`` and the asset cache."""
    skip = [p.resolve() for p in skip]
    out = {}
    for p in sorted(root.rglob("*")):
        rp = p.resolve() if not p.is_symlink() else p
        if any(rp == s or s in rp.parents for s in skip):
            continue
        if p.is_file():
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        else:
            out[p.relative_to(root).as_posix()] = ("dir",)
    return out


def assert_not_complete(out: Path) -> None:
    if not out.exists():
        return
    assert not (out / "report.md").exists()
    config = out / "lolcats_config.json"
    if config.exists():
        try:
            record = json.loads(config.read_text())
        except ValueError:
            return
        assert record.get("status") != "complete", f"{out} looks complete"


@pytest.mark.parametrize("name,build,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, expect, finished_run, tmp_path, monkeypatch, capsys):
    root = tmp_path / "user-space"
    (root / "user").mkdir(parents=True)
    (root / "user" / "notes.txt").write_text("the user's own file")
    (root / "home").mkdir()
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("LOLCATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(root)
    w = World(root, finished_run)
    argv, out = build(w)
    before = snapshot(root, [p for p in (out, w.out) if p is not None])
    shared_before = snapshot(finished_run, [])
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit code {code}; stderr:\n{err[-2000:]}"
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert expect in errors[0], f"{expect!r} not in {errors[0]!r}"
    assert snapshot(root, [p for p in (out, w.out) if p is not None]) == before, "files outside out_dir changed"
    assert snapshot(finished_run, []) == shared_before
    for target in (out, w.out):
        if target is not None:
            assert_not_complete(target)


def test_case_count():
    """The issue asks for at least 60 distinct cases."""
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)

