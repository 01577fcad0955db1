"""Peak memory of stage 1 and stage 2 on SmolLM2 against `lolcats plan`, and the throughput cost of checkpointing.

    python scripts/bench_memory.py [--recipe recipes/smollm2_135m.yaml] [--lengths 512 1024] [--steps 3]
                                   [--timing-steps 3] [--work runs/bench_memory] [--json docs/bench_memory.json]

Memory: each run is its own process, `lolcats linearize RECIPE` with the report off and one stage training
(`distill.max_steps=N lora.max_steps=0`, or the other way round), activation checkpointing on or off, at each
`data.seq_len`; its peak RSS comes from the kernel (os.wait4). One more process holds the runtime alone (Python,
torch, transformers, peft, the tokenizer and the tokenised data; no model), which `plan` does not count: the
prediction is plan's stage total plus what that process holds resident at its end. Every run is made twice: with
glibc's malloc as it is (what a user sees), and with MALLOC_MMAP_THRESHOLD_=65536, under which every freed block
of 64 kB or more goes back to the system at once, so the peak is what the tensors themselves need (much slower:
every large allocation faults its pages in again).

Throughput: one process trains steps of each stage at the longest length with checkpointing off and on in turn
(same model, same chunks, so the machine's load falls on both alike; the heap is released where the training loop
releases it) and reports median seconds per step, wall clock and CPU time (user + system). Prints tables and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNTIME = """
import sys, torch, transformers, peft, lolcats.cli, lolcats.pipeline
from lolcats.base_model import base_config, load_tokenizer
from lolcats.config import load_config
from lolcats.data import build_train_data
cfg = load_config(sys.argv[1], sys.argv[2:])
d = cfg.data
data = build_train_data(d.train, load_tokenizer(base_config(cfg.model)[0]), d.seq_len, d.heldout_chunks,
                        before=d.train_filter)
print("RSS", next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS")))
"""

TIMING = """
import json, resource, sys, time, torch
from lolcats.base_model import load_base
from lolcats.config import load_config
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import build_train_data
from lolcats.distill import AttentionTransfer
from lolcats.finetune import (_release_before_logits, add_lora, checkpointed_layers, heap_released_per_layer,
                              lora_parameters, stage2_loss)
from lolcats.positions import shifted_positions
from lolcats.training import release_heap

cfg = load_config(sys.argv[1], sys.argv[3:])
steps = int(sys.argv[2])
torch.set_num_threads(cfg.threads or torch.get_num_threads())
model, tokenizer, _ = load_base(cfg.model)
d = cfg.data
train, _ = build_train_data(d.train, tokenizer, d.seq_len, 1, before=d.train_filter)
convert_model(model, cfg.attention, seed=cfg.seed)

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def timed(step, n):
    out = {False: {"wall": [], "cpu": []}, True: {"wall": [], "cpu": []}}
    for i in range(2 * n):  # off, on, off, on, ...: both see the same load
        on = bool(i % 2)
        w, c = time.perf_counter(), cpu()
        step(on, train[i // 2][0], train[i // 2][1])
        out[on]["wall"].append(time.perf_counter() - w)
        out[on]["cpu"].append(cpu() - c)
    return {"off" if not k else "on": v for k, v in out.items()}

result = {}
with shifted_positions(model, d.max_position_offset, cfg.seed):
    params = list(trainable_attention_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.distill.lr)
    transfer = AttentionTransfer(model, cfg.distill)

    def stage1(on, ids, labels):
        for layer in transfer.layers:
            layer.activation_checkpointing = on
        opt.zero_grad(set_to_none=True)
        loss = transfer.loss(ids, labels)[0]
        release_heap()  # where lolcats.training.Trainer releases it
        loss.backward()
        opt.step()
        release_heap()

    result["stage1"] = timed(stage1, steps)
    transfer.close()
    peft_model = add_lora(model, cfg.lora, cfg.seed).train()
    opt = torch.optim.AdamW(list(lora_parameters(peft_model).values()), lr=cfg.lora.lr)
    loss_fn = stage2_loss(peft_model, cfg.lora)
    peft_model.get_output_embeddings().register_forward_pre_hook(_release_before_logits)  # as run_stage2 does

    def stage2(on, ids, labels):
        opt.zero_grad(set_to_none=True)
        with checkpointed_layers(peft_model, on), heap_released_per_layer(peft_model, not on):  # as run_stage2
            loss = loss_fn(ids, labels)[0]
            release_heap()
            loss.backward()
        opt.step()
        release_heap()

    result["stage2"] = timed(stage2, steps)
print("TIMING " + json.dumps(result))
"""


ALLOCATORS = {"glibc": {}, "freed at once": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run(name: str, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; its wall time, CPU time, peak RSS (kernel accounting) and output. Stops on failure."""
    print(f"== {name}: {' '.join(cmd)[:200]}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{name} failed ({code}):\n{out[-3000:]}")
    r = {"seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
         "peak_rss_bytes": usage.ru_maxrss * 1024, "output": out}
    print(f"   peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB, {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/smollm2_135m.yaml")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="data.seq_len values")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of the measured stage")
    ap.add_argument("--timing-steps", type=int, default=3, help="steps per setting in the throughput run (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench_memory")
    ap.add_argument("--json", default="docs/bench_memory.json")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args()

    from lolcats.config import load_config
    from lolcats.plan import plan

    work = Path(args.work)
    cli = [sys.executable, "-m", "lolcats.cli", "linearize", args.recipe]
    common = [f"threads={args.threads}", "report.enabled=false", "data.heldout_chunks=1", *args.overrides]
    for stage in ("distill", "lora"):  # evaluate and checkpoint once, at the end
        common += [f"{stage}.eval_every=100000", f"{stage}.checkpoint_every=100000", f"{stage}.grad_accum=1"]
    rows = []
    for seq in args.lengths:
        lengths = [f"data.seq_len={seq}", f"data.eval_seq_len={seq}"]
        predicted = plan(load_config(args.recipe, [*common, *lengths]), recipe_dir=Path(args.recipe).parent)["memory"]
        for allocator, env in ALLOCATORS.items():
            runtime = run(f"runtime, {seq} tokens, {allocator}", [sys.executable, "-c", RUNTIME, args.recipe, *common,
                                                                   *lengths], env)
            base = int(next(line for line in runtime["output"].splitlines() if line.startswith("RSS "))[4:])
            for stage, key, train in ((1, "stage1", [f"distill.max_steps={args.steps}", "lora.max_steps=0"]),
                                      (2, "stage2", ["distill.max_steps=0", f"lora.max_steps={args.steps}"])):
                section = "distill" if stage == 1 else "lora"
                for on in (False, True):
                    name = f"stage{stage}-{seq}-{'ckpt' if on else 'nockpt'}-{allocator.replace(' ', '_')}"
                    out = [f"out_dir={work / name}", f"{section}.activation_checkpointing={str(on).lower()}"]
                    r = run(name, [*cli, *common, *lengths, *train, *out, "--overwrite"], env)
                    model_part = predicted[key]["with_checkpointing" if on else "without_checkpointing"]["total"]
                    rows.append({"stage": stage, "seq_len": seq, "checkpointing": on, "allocator": allocator,
                                 "steps": args.steps, "peak_rss_bytes": r["peak_rss_bytes"], "runtime_rss_bytes": base,
                                 "plan_bytes": model_part, "predicted_bytes": model_part + base,
                                 "measured_over_predicted": r["peak_rss_bytes"] / (model_part + base),
                                 "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]})
    timing = None
    if args.timing_steps:
        seq = max(args.lengths)
        r = run(f"throughput, {seq} tokens", [sys.executable, "-c", TIMING, args.recipe, str(args.timing_steps),
                                              *common, f"data.seq_len={seq}"])
        raw = json.loads(next(line for line in r["output"].splitlines() if line.startswith("TIMING "))[7:])
        timing = {"seq_len": seq, "steps_per_setting": args.timing_steps, "raw": raw}
        for stage, t in raw.items():
            med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in t.items()}
            timing[stage] = {"median_seconds_per_step": med,
                             "slowdown_wall": med["on"]["wall"] / med["off"]["wall"],
                             "slowdown_cpu": med["on"]["cpu"] / med["off"]["cpu"]}
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu}",
              "torch": torch.__version__, "recipe": args.recipe,
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "common_overrides": common,
              "runs": rows, "throughput": timing}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    gb = 1e9
    print("\n| stage | tokens | checkpointing | peak RSS: glibc / freed at once | runtime | plan | plan + runtime | "
          "measured / predicted: glibc / freed at once |\n|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["allocator"] != "glibc":
            continue
        live = next(x for x in rows if x["allocator"] != "glibc" and
                    (x["stage"], x["seq_len"], x["checkpointing"]) == (r["stage"], r["seq_len"], r["checkpointing"]))
        print(f"| {r['stage']} | {r['seq_len']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['peak_rss_bytes'] / gb:.2f} / {live['peak_rss_bytes'] / gb:.2f} GB | {r['runtime_rss_bytes'] / gb:.2f} GB | "
              f"{r['plan_bytes'] / gb:.2f} GB | {r['predicted_bytes'] / gb:.2f} GB | "
              f"{r['measured_over_predicted']:.2f} / {live['measured_over_predicted']:.2f} |")
    if timing:
        print(f"\nthroughput at {timing['seq_len']} tokens, median of {timing['steps_per_setting']} steps each, off and "
              "on in turn:\n\n| stage | s/step off (wall / CPU) | s/step on (wall / CPU) | slowdown (wall / CPU) |\n"
              "|---|---:|---:|---:|")
        for stage in ("stage1", "stage2"):
            m = timing[stage]["median_seconds_per_step"]
            print(f"| {stage} | {m['off']['wall']:.1f} / {m['off']['cpu']:.1f} | {m['on']['wall']:.1f} / "
                  f"{m['on']['cpu']:.1f} | {timing[stage]['slowdown_wall']:.2f}× / {timing[stage]['slowdown_cpu']:.2f}× |")
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
