"""Where a training step's time goes: torch.profiler over two optimizer steps of `qlora-nb train` on the real model.

    python bench/profile_train_step.py                   # fp32, unpacked
    python bench/profile_train_step.py --bf16 --packing  # any of the two flags
    python bench/profile_train_step.py --perf [--bf16]   # Linux perf's sampling instead of torch.profiler

Same settings as bench/bench_train.py's real-model rows (4-bit NF4 + double quant, LoRA r 64 on every linear layer but
lm_head, batch 4, source/target_max_len 256, 1 thread, activation checkpointing). Steps 3 and 4 are profiled. Prints the
share of CPU time (self time of the leaf operators) by kind: matrix products (split into lm_head's and the rest), 4-bit
dequantization, attention, the loss, the optimizer step, and the rest; and the tokens of the profiled steps.

`--perf` samples steps 3-8 with Linux perf (`perf record`, 999 Hz, switched on and off from inside the run through
perf's control fifo) instead, and groups the samples by library and function: matrix products (oneDNN's JIT code and
MKL), the torch kernels between them, attention, the loss, 4-bit dequantization, glibc's malloc and free, the kernel
(page faults) and the Python interpreter. Prefer it on the CPU: torch.profiler's own records share the heap with the
run's tensors and change what each allocation costs. Under it one bf16 step took 8.8-11.5 CPU s instead of about 2.7, and a
copy of a 4 x 149 x 1536 bf16 tensor 8.3 ms against 0.09 ms for 4 x 134 x 1536 in the same run, so its shares
over-count the elementwise work. perf cannot tell lm_head's products from the others', nor see inside oneDNN's JIT code.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

from harness import ROOT, Observer, run_qlora_nb  # bench/harness.py
WORK = ROOT/"bench"/"_work"


def kind(name: str, shapes) -> str:
    "The kind of a leaf operator, by name (and for products, by whether a 49152-wide vocabulary is in its shapes)."
    if "bitsandbytes" in name or "dequantize" in name: return "4-bit dequantize"
    if "attention" in name or "scaled_dot_product" in name: return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"):
        return "lm_head product" if any(49152 in (s or []) for s in shapes or []) else "other products"
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")): return "loss (log-softmax, nll)"
    if "_foreach" in name or "adam" in name.lower(): return "optimizer kernels"
    return "rest (elementwise, norms, copies, casts)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bf16", action="store_true"); p.add_argument("--packing", action="store_true")
    p.add_argument("--full_logits", action="store_true", help="QLoRATrainer.label_only_loss = False")
    p.add_argument("--perf", action="store_true", help="sample steps 3-8 with Linux perf instead of torch.profiler")
    p.add_argument("--perf-control", nargs=2, default=None, help=argparse.SUPPRESS)  # inside perf: its fifos
    opts = p.parse_args(argv)
    if opts.perf: return perf_main(opts, argv if argv is not None else sys.argv[1:])
    import torch
    torch.set_num_threads(1)
    import transformers
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback
    from qlora_nb.sources import known_model_folder
    from bench_train import qlora_nb_argv
    model = known_model_folder("smollm2-135m-instruct")
    data = WORK/"alpaca-2000.json"
    if not data.exists():
        from qlora_nb.tiny import make_alpaca_records
        WORK.mkdir(parents=True, exist_ok=True); data.write_text(json.dumps(make_alpaca_records(2000, seed=0)))
    observer = Observer(); observer.install()  # the tokens and CPU seconds of the profiled steps
    state = dict(prof=None)

    last = 8 if opts.perf_control else 4  # perf: 6 steps for enough samples; torch.profiler: 2 (its records are large)

    class Prof(TrainerCallback):  # after the observer's step clock, whose steps 3 and 4 (end to end) are timed
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == 2 and opts.perf_control: perf_command(opts.perf_control, "enable")
            elif st.global_step == 2:
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True); state["prof"].__enter__()
        def on_step_end(self, args, st, control, **kw):
            if st.global_step == last and opts.perf_control: perf_command(opts.perf_control, "disable")
            elif st.global_step == last and state["prof"] is not None: state["prof"].__exit__(None, None, None)
    transformers.trainer.DEFAULT_CALLBACKS.append(Prof())
    if opts.full_logits:
        from qlora_nb.train import QLoRATrainer
        QLoRATrainer.label_only_loss = False
    spec = dict(model=str(model), data=str(data), output_dir=str(WORK/"runs"/"profile"), steps=last, batch_size=4,
                source_max_len=256, target_max_len=256, lora_r=64, lora_alpha=16, lora_dropout=0.0,
                optim="paged_adamw_32bit", bf16=opts.bf16)
    run_qlora_nb(qlora_nb_argv(spec, packing=opts.packing))
    steps = observer.result(warmup=2, upto=last)
    if opts.perf_control:
        (WORK/"perf_steps.json").write_text(json.dumps(steps)); return
    prof = state["prof"]
    events = prof.key_averages(group_by_input_shape=True)
    shares = {}
    for e in events:
        if e.self_cpu_time_total <= 0: continue
        k = kind(e.key, e.input_shapes)
        shares[k] = shares.get(k, 0) + e.self_cpu_time_total
    opt = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step"))
    total = sum(shares.values())
    cpu_s, real, trained = steps["cpu_s"], steps["real_tokens"], steps["trained_tokens"]
    label = f"{'bf16' if opts.bf16 else 'fp32'}{' --packing' if opts.packing else ''}{' full logits' if opts.full_logits else ''}"
    print(f"\nPROFILE {label}: 2 steps, {real} real / {trained} trained tokens, {cpu_s:.1f} CPU s "
          f"({real / cpu_s:.0f} real tok / CPU s), profiled self time {total / 1e6:.1f} s")
    for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {k:42s} {v / 1e6:7.2f} s  {100 * v / total:5.1f} %")
    print(f"  {'(optimizer step, inclusive)':42s} {opt / 1e6:7.2f} s  {100 * opt / total:5.1f} %")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("  top operators (self CPU s): " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f}" for e in top))



def perf_command(control, command: str):
    "Tell the perf record this process runs under to `command` (enable, disable) its events, and wait for its ack."
    ctl, ack = control
    with open(ctl, "w") as f: f.write(command + "\n")
    with open(ack) as f: f.readline()


MALLOC = {"_int_malloc", "_int_free", "malloc_consolidate", "unlink_chunk.constprop.0", "malloc", "cfree@GLIBC_2.2.5",
          "free", "_mid_memalign.constprop.0", "_int_memalign", "sysmalloc", "realloc", "calloc", "_int_realloc",
          "__posix_memalign", "posix_memalign", "__libc_malloc", "__libc_free", "tcache_init.part.0", "systrim.constprop.0"}


def perf_kind(dso: str, sym: str) -> str:
    "The kind of a perf sample, by its library and function."
    if dso.startswith("[JIT]") or "gemm" in sym or "mkl_blas" in sym or "dnnl" in sym: return "matrix products (oneDNN, MKL)"
    if "bitsandbytes" in dso: return "4-bit dequantize (bitsandbytes)"
    if "flash_attention" in sym: return "attention"
    if "log_softmax" in sym or "nll_loss" in sym: return "loss (log-softmax, nll)"
    if dso.startswith("[kernel"): return "kernel (page faults, zeroing pages)"
    if "libc.so" in dso and sym in MALLOC: return "glibc malloc / free"
    if "libpython" in dso or "libtorch_python" in dso: return "Python interpreter, torch bindings"
    if "libtorch" in dso or "libc10" in dso or "libgomp" in dso or "libm.so" in dso or "libc.so" in dso or "sleef" in sym.lower():
        return "torch kernels between products (elementwise, norms, copies, casts)"
    return "other"


def perf_main(opts, argv) -> None:
    "Run this script under `perf record`, sampling steps 3-8 only, then print the shares by kind."
    if shutil.which("perf") is None: sys.exit("perf is not installed here (Linux perf, e.g. apt install linux-tools): "
                                              "run without --perf for torch.profiler's view")
    inner = [a for a in argv if a != "--perf"]
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = Path(tmp)/"ctl", Path(tmp)/"ack", Path(tmp)/"perf.data"
        os.mkfifo(ctl); os.mkfifo(ack)
        cmd = ["perf", "record", "-F", "999", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(data), "--",
               sys.executable, __file__, *inner, "--perf-control", str(ctl), str(ack)]
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if rc: sys.exit(f"perf record exited {rc} (see above); if it may not sample here, lower "
                        "/proc/sys/kernel/perf_event_paranoid, or run without --perf for torch.profiler's view")
        report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso,sym", "--stdio", "-F",
                                 "sample,dso,sym", "--field-separator", "\t"], capture_output=True, text=True,
                                check=True).stdout
    shares, functions = {}, {}  # samples by kind, and by function (oneDNN's JIT code as one)
    for line in report.splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) < 3: continue
        n, dso, sym = int(parts[0]), parts[1].strip(), parts[2].strip().split("] ", 1)[-1]  # "[.] name" / "[k] name"
        k = perf_kind(dso, sym); shares[k] = shares.get(k, 0) + n
        name = "oneDNN JIT code" if dso.startswith("[JIT]") else f"{sym[:70]} ({dso.split('/')[-1]})"
        functions[name] = functions.get(name, 0) + n
    total = sum(shares.values())
    steps = json.loads((WORK/"perf_steps.json").read_text())
    cpu_s, real = steps["cpu_s"], steps["real_tokens"]
    print(f"\nPERF {'bf16' if opts.bf16 else 'fp32'}{' --packing' if opts.packing else ''}: steps 3-8, {real} real "
          f"tokens, {cpu_s:.1f} CPU s ({real / cpu_s:.0f} real tok / CPU s)")
    for k, v in sorted(shares.items(), key=lambda kv: -kv[1]): print(f"  {k:70s} {100 * v / total:5.1f} %")
    top = sorted(functions.items(), key=lambda kv: -kv[1])[:15]
    print("  top functions: " + "; ".join(f"{f} {100 * n / total:.1f} %" for f, n in top))


if __name__ == "__main__": main()
