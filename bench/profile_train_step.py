"""Where a training step's time goes: torch.profiler over two optimizer steps of `qlora-nb train` on the real model.

    python bench/profile_train_step.py                   # fp32, unpacked
    python bench/profile_train_step.py --bf16 --packing  # any of the two flags

Same settings as bench/bench_train.py's real-model rows (4-bit NF4 + double quant, LoRA r 64 on every linear layer but
lm_head, batch 4, source/target_max_len 256, 1 thread, activation checkpointing). Steps 3 and 4 are profiled. Prints the
share of CPU time (self time of the leaf operators) by kind: matrix products (split into lm_head's and the rest), 4-bit
dequantization, attention, the loss, the optimizer step, and the rest; and the tokens of the profiled steps.
"""
import argparse, json

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
    opts = p.parse_args(argv)
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

    class Prof(TrainerCallback):  # after the observer's step clock, whose steps 3 and 4 (end to end) are timed
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == 2:
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True); state["prof"].__enter__()
        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 4 and state["prof"] is not None: state["prof"].__exit__(None, None, None)
    transformers.trainer.DEFAULT_CALLBACKS.append(Prof())
    if opts.full_logits:
        from qlora_nb.train import QLoRATrainer
        QLoRATrainer.label_only_loss = False
    spec = dict(model=str(model), data=str(data), output_dir=str(WORK/"runs"/"profile"), steps=4, batch_size=4,
                source_max_len=256, target_max_len=256, lora_r=64, lora_alpha=16, lora_dropout=0.0,
                optim="paged_adamw_32bit", bf16=opts.bf16)
    run_qlora_nb(qlora_nb_argv(spec, packing=opts.packing))
    prof, steps = state["prof"], observer.result(warmup=2, upto=4)
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


if __name__ == "__main__": main()
