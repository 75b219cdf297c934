"""What compiling the decoder blocks would gain on the CPU: CPU seconds of training steps on the real model, eager
against each block compiled in place (torch.compile's regional compilation, dynamic shapes), in fp32 and bf16.

    python bench/bench_compile.py                  # fp32 and bf16, each mode in its own process, one thread: ~6 min
    python bench/bench_compile.py --dtypes bf16

The measurement that led to `qlora-nb train --compile_blocks` (RESULTS.md, "Tried on 2026-12-05" and "Compiled
blocks"); the blocks are compiled as that flag compiles them (`qlora_nb.train.compile_blocks`).
SmolLM2-135M-Instruct (`qlora-nb get-model`), 4-bit NF4, LoRA r 64 on every linear layer, qlora_nb's loader,
activation checkpointing on (as in every bench_train row); batches of 4 random rows whose length changes at every step (as group_by_length's batches do, so a
compiler that specialised on one length would recompile), the loss over every position. Each block is compiled with
`block.compile(dynamic=True)`, and torch._dynamo may skip replaying side effects under checkpointing
(`skip_fwd_side_effects_in_bwd_under_checkpoint`: transformers' hub-kernel RMSNorm sets a context variable, which
otherwise breaks the graph). Printed per mode: the first step's CPU seconds (the compilation), the sum over the steps
after the first two, the ratio to eager, the peak RSS, and the last loss.
"""
import argparse, resource, sys, time

from harness import ROOT, WORKER, run_worker, worker_main  # bench/harness.py: offline, this checkout on sys.path

MODES = ("eager", "compiled")
LENGTHS = [134, 120, 150, 101, 177, 134, 142, 99, 160, 128, 111, 149]  # around the real bench's mean row (134)


def measure(spec: dict) -> dict:
    "One mode in this (fresh) process: its figures."
    import torch
    torch.set_num_threads(1)
    from qlora_nb.config import parse_args
    from qlora_nb.model import get_accelerate_model
    from qlora_nb.sources import known_model_folder
    mode, bf16 = spec["mode"], spec["dtype"] == "bf16"
    args = parse_args(["--model_name_or_path", str(known_model_folder("smollm2-135m-instruct")), "--use_cpu",
                       "--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0", "--output_dir", spec["out"],
                       *(["--bf16"] if bf16 else [])], quiet=True)
    torch.manual_seed(0)  # the same initial adapters in both modes' processes
    model, _ = get_accelerate_model(args)
    model.train()
    if mode == "compiled":
        from qlora_nb.train import compile_blocks
        compile_blocks(model)
    times = []
    for step, length in enumerate(LENGTHS):
        ids = torch.randint(100, 40000, (4, length), generator=torch.Generator().manual_seed(step))
        c0 = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16): loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.process_time() - c0)
    return dict(first_s=times[0], rest_s=sum(times[2:]), loss=loss.item(),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per mode's process")
    o = p.parse_args(argv)
    work = ROOT/"bench"/"_work"/"compile"; work.mkdir(parents=True, exist_ok=True)
    print(f"| dtype | blocks | first step CPU s | steps 3-{len(LENGTHS)} CPU s | vs eager | peak RSS MB | last loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype in o.dtypes.split(","):
        rows = {}
        for mode in MODES:
            spec = dict(mode=mode, dtype=dtype, out=str(work/"run"))
            rows[mode] = run_worker(__file__, spec, work/f"{mode}-{dtype}", o.timeout, threads=1)
            if "error" in rows[mode]: sys.exit(f"{mode} {dtype}: {rows[mode]['error']}")
        for mode, r in rows.items():
            print(f"| {dtype} | {mode} | {r['first_s']:.1f} | {r['rest_s']:.2f} | {rows['eager']['rest_s'] / r['rest_s']:.2f}x "
                  f"| {r['peak_rss_mb']:.0f} | {r['loss']:.5f} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]: worker_main(measure)
    else: main()
