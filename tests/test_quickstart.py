"""examples/quickstart.py, the README's Python example, runs as shown on a tiny local model (no assets)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart.py"


def run_example(model: Path | None, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LOLCATS_MODEL"} | {"OMP_NUM_THREADS": "1"}
    if model is not None:
        env["LOLCATS_MODEL"] = str(model)
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{EXAMPLE.read_text()}```\n" in readme


def test_quickstart_converts_and_generates(tmp_path):
    model = make_tiny_model_folder(tmp_path / "base")
    out = run_example(model)
    # tiny Llama: 2 layers × (2 maps × 4 heads × head_dim 16 × f 64 + 4 window factors)
    assert re.search(r"^trainable parameters: 16392$", out, re.M), out
    assert re.search(r"^converted, untrained: .+$", out, re.M), out


def test_quickstart_linearizes_and_loads(tiny_run):
    recipe, folder = tiny_run
    out = run_example(folder / "base", str(recipe), "distill.max_steps=2", "lora.max_steps=2")
    assert re.search(r"^linearized: .+$", out, re.M), out
    assert (folder / "out" / "attention.safetensors").is_file()
    assert (folder / "out" / "adapter").is_dir()


@pytest.mark.integration
def test_quickstart_on_smollm2_as_the_readme_says():
    """The default model (the offline SmolLM2, fetched by scripts/setup.sh): the count the README quotes."""
    from lolcats import assets

    if not (assets.paths().smollm2 / "config.json").exists():
        pytest.fail("SmolLM2 is not fetched; run `bash scripts/setup.sh` first (or deselect with -m 'not integration')")
    out = run_example(None)
    assert re.search(r"^trainable parameters: 2212110$", out, re.M), out
    assert re.search(r"^converted, untrained: .*\w", out, re.M), out
