"""Convert a model, count what trains, generate; given a recipe, also linearize it and load the result.

    [LOLCATS_MODEL=MODEL] python examples/quickstart.py [RECIPE.yaml [key=value ...]]
"""

import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import lolcats
from lolcats.sources import resolve_model


def complete(model, tokenizer, prompt="The history of the United States"):
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)  # a constant-size state per sequence
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


# MODEL: an HF folder or hub id, a .gguf file, or lolcats:smollm2-135m-instruct (the offline default)
path = resolve_model(os.environ.get("LOLCATS_MODEL", "lolcats:smollm2-135m-instruct"))
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
lolcats.convert_model(model, lolcats.AttentionConfig(variant="terraced", window_size=64))
# every base weight is frozen; only feature maps and window factors train (2,212,110 for SmolLM2-135M)
print("trainable parameters:", sum(p.numel() for p in model.parameters() if p.requires_grad))
print("converted, untrained:", complete(model, tokenizer))

if len(sys.argv) > 1:  # stage 1 + stage 2 into out_dir (rerun to resume), then rebuild the result from it
    config = lolcats.load_config(sys.argv[1], sys.argv[2:])
    lolcats.linearize(config)
    trained = lolcats.load(config.out_dir)  # base + attention.safetensors + adapter, checksums verified
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.name_or_path))
    print("linearized:", complete(trained, tokenizer))
