"""What activation checkpointing costs on the real model: CPU seconds and memory of a training step with every block's
activations recomputed (qlora.py's default, and every configuration of bench_train.py), with matrix products kept and
the rest recomputed (torch's selective checkpointing), and with nothing recomputed.

    python bench/bench_checkpointing.py            # fp32 and bf16, each mode in its own process, one thread
    python bench/bench_checkpointing.py --dtypes bf16 --steps 6

SmolLM2-135M-Instruct (`qlora-nb get-model`), 4-bit NF4, LoRA r 64 on every linear layer, qlora_nb's loader; one batch
of 4 x 134 random tokens (the real bench's mean row length), the loss over every position. Printed per mode: CPU seconds
per step (the first step untimed) and the kernel's share of it (page faults: fresh memory for the activations), the
process's peak RSS and its growth over the steps, the last loss, and the largest difference of the LoRA gradients from
full checkpointing's (the three modes compute the same gradients).
"""
import argparse, functools, resource, sys, time
from pathlib import Path

from harness import ROOT, WORKER, run_worker, worker_main  # bench/harness.py: offline, this checkout on sys.path
import torch
from torch.utils.checkpoint import CheckpointPolicy

MODES = ("full", "selective", "none")
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def policy(ctx, op, *args, **kwargs):
    "Selective checkpointing: keep every matrix product's output, recompute everything else (called for every op)."
    return CheckpointPolicy.MUST_SAVE if op in PRODUCTS else CheckpointPolicy.PREFER_RECOMPUTE


def measure(spec: dict) -> dict:
    "One mode in this (fresh) process (run_worker started it): the figures; the last step's LoRA gradients to a file."
    mode, dtype, steps, out = spec["mode"], spec["dtype"], spec["steps"], Path(spec["grads"])
    torch.set_num_threads(1)
    import qlora_nb.lora as lora
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    from qlora_nb.config import parse_args
    from qlora_nb.model import get_accelerate_model
    from qlora_nb.sources import known_model_folder
    if mode == "selective":  # transformers passes these keywords on to torch.utils.checkpoint.checkpoint
        lora.CHECKPOINTING["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    flags = (["--bf16"] if dtype == "bf16" else []) + (["--gradient_checkpointing", "False"] if mode == "none" else [])
    args = parse_args(["--model_name_or_path", str(known_model_folder("smollm2-135m-instruct")), "--use_cpu",
                       "--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0", "--output_dir", str(out.parent),
                       *flags], quiet=True)
    torch.manual_seed(0)  # the same initial adapters in every mode's process
    model, _ = get_accelerate_model(args)
    model.train()
    ids = torch.randint(100, 40000, (4, 134), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    rss0, times, system = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, [], []
    for _ in range(steps + 1):
        c0, s0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        with autocast: loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        times.append(time.process_time() - c0); system.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    torch.save(grads, out)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(mode=mode, dtype=dtype, cpu_s=sum(times[1:]) / steps, system_s=sum(system[1:]) / steps, loss=loss.item(), peak_rss_mb=rss1 / 1024,
                growth_mb=(rss1 - rss0) / 1024)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16"); p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per mode's process")
    p.add_argument("--work", default=str(ROOT/"bench"/"_work"/"checkpointing"))
    o = p.parse_args(argv)
    work = Path(o.work); work.mkdir(parents=True, exist_ok=True)
    print("| dtype | checkpointing | CPU s / step | of which system | vs full | peak RSS MB | growth MB | loss | largest gradient difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in o.dtypes.split(","):
        rows = {}
        for mode in MODES:
            spec = dict(mode=mode, dtype=dtype, steps=o.steps, grads=str(work/f"grads-{mode}-{dtype}.pt"))
            rows[mode] = run_worker(__file__, spec, work/f"{mode}-{dtype}", o.timeout, threads=1)
            if "error" in rows[mode]: sys.exit(f"{mode} {dtype}: {rows[mode]['error']}")
        ref = torch.load(work/f"grads-full-{dtype}.pt")
        for mode, r in rows.items():
            grads = torch.load(work/f"grads-{mode}-{dtype}.pt")
            diff = max((grads[k] - ref[k]).abs().max().item() for k in ref)
            print(f"| {dtype} | {mode} | {r['cpu_s']:.2f} | {r['system_s']:.2f} | {rows['full']['cpu_s'] / r['cpu_s']:.2f}x | "
                  f"{r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | {r['loss']:.5f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]: worker_main(measure)
    else: main()
