"""Stage-1 training throughput against a plain forward pass of the same model on the same chunks.

    .venv/bin/python scripts/bench_train.py [--model lolcats:smollm2-135m-instruct] [--repeats 5]

Both are timed in one run, interleaved, on the same 1024-token chunks; the figure is the ratio of
medians (stage-1 tokens/s ÷ forward tokens/s). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lolcats.base_model import load_base
from lolcats.config import AttentionConfig, DistillConfig, ModelConfig
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import build_train_data
from lolcats.distill import AttentionTransfer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct")
    ap.add_argument("--variant", default="terraced")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_train.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_base(ModelConfig(name_or_path=args.model, device="cpu"))
    train, _ = build_train_data("lolcats:sotu", tokenizer, args.seq_len, 1, before="2000")
    chunks = [train[i][0] for i in range(args.repeats + 1)]
    baseline = model

    def forward(ids: torch.Tensor) -> None:
        with torch.no_grad():
            baseline(ids, use_cache=False)

    forward(chunks[0])
    fwd_times = []
    torch.manual_seed(0)
    import copy

    student = convert_model(copy.deepcopy(model), AttentionConfig(variant=args.variant))
    params = list(trainable_attention_parameters(student).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    transfer = AttentionTransfer(student, DistillConfig())

    def train_step(ids: torch.Tensor) -> None:
        opt.zero_grad()
        loss, _ = transfer.loss(ids, ids)
        loss.backward()
        opt.step()

    train_step(chunks[0])  # warm-up
    train_times = []
    for ids in chunks[1:]:
        t = time.perf_counter()
        forward(ids)
        fwd_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        train_step(ids)
        train_times.append(time.perf_counter() - t)

    fwd = args.seq_len / statistics.median(fwd_times)
    st1 = args.seq_len / statistics.median(train_times)
    result = {
        "model": args.model, "variant": args.variant, "seq_len": args.seq_len, "repeats": args.repeats,
        "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
        "forward_tokens_per_s": fwd, "stage1_tokens_per_s": st1, "ratio": st1 / fwd,
        "forward_times_s": fwd_times, "stage1_times_s": train_times,
    }
    print(f"| {'what':<34} | {'median tokens/s':>15} |")
    print(f"|{'-' * 36}|{'-' * 17}|")
    print(f"| {'plain forward (sdpa, no grad)':<34} | {fwd:>15.0f} |")
    print(f"| {'stage 1 (teacher+student+backward)':<34} | {st1:>15.0f} |")
    print(f"| {'ratio stage 1 / forward':<34} | {st1 / fwd:>15.2f} |")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
