"""bf16 against fp32 on the real model: the per-step training loss of `qlora-nb train --bf16` and of the fp32 run, under
torch's AVX-512 and AVX2 kernel sets, with a tolerance derived from bfloat16's precision (printed with the figures).

    python bench/bench_bf16_loss.py                 # SmolLM2-135M-Instruct, 12 steps x 4 runs: 20 minutes on 2 loaded cores
    python bench/bench_bf16_loss.py --steps 20 --capabilities avx512,avx2,default

Both runs of a pair see the same batches in the same order (same seed, same data, same sampler) and start from the same
adapters (peft's init under the same seed), so any difference in their losses comes from the precision: the forward in
bf16 (4-bit weights dequantized to bf16, activations and LoRA weights in bf16 under autocast), and the updates of bf16
LoRA weights. The tolerance (see `tolerance` below):

    |loss_bf16(t) - loss_fp32(t)| <= sqrt(n) * u * loss_fp32(t) + r * |loss_fp32(t) - loss_fp32(0)|

  u = 2**-8, bfloat16's unit roundoff (8 significant bits); n = the bf16 roundings on the path from the embedding to a
  logit (per decoder layer: the inputs of q/k/v, the attention output, o_proj, the MLP input, the gate*up product and
  down_proj's output, 8 in all; plus the final norm and lm_head: 8 * layers + 2). Rounding errors of round-to-nearest are
  independent and zero-mean, so their relative effect grows like sqrt(n) * u, not n * u (Higham and Mary, "A new
  approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019: |error| <= lambda * sqrt(n) * u with
  probability 1 - 2 exp(-lambda**2 / 2); lambda = 1 here, and a mean over hundreds of label tokens averages further).
  The relative error of the logits becomes the same relative error of the loss scale (the loss is a difference of
  logits, log-sum-exp minus the target's). The second term is the training the bf16 run may lose: its LoRA weights are
  bfloat16, so each update of a weight w is rounded by up to u * |w| / 2, against an Adam update of about lr per step:
  r = u * max|w| / (2 lr), with max|w| = 1 / sqrt(hidden_size), the bound of peft's Kaiming-uniform init of lora_A
  (lora_B starts at 0 and stays far smaller in these few steps). A bf16 run that learned nothing would fail it.
It is a benchmark: it prints the figures and whether each step is within the tolerance; exit status 1 if one is not.
"""
import argparse, json, math, os, subprocess, sys

from harness import ROOT  # bench/harness.py: offline, this checkout on sys.path
WORK = ROOT/"bench"/"_work"/"bf16_loss"
U_BF16 = 2.0 ** -8  # bfloat16: 8 significant bits (7 stored), round to nearest


def roundings_per_logit(num_layers: int) -> int:
    "The bf16 roundings on the path to a logit: 8 per decoder layer, then the final norm and lm_head."
    return 8 * num_layers + 2


def update_rounding_share(hidden_size: int, lr: float) -> float:
    "r: the share of an Adam step (about lr) that rounding a bf16 LoRA weight (at most 1/sqrt(hidden_size)) may lose."
    return U_BF16 / math.sqrt(hidden_size) / (2 * lr)


def tolerance(loss0: float, loss: float, num_layers: int, r: float) -> float:
    "How far the bf16 run's loss may be from the fp32 run's `loss` at a step (the fp32 run started at `loss0`)."
    return math.sqrt(roundings_per_logit(num_layers)) * U_BF16 * loss + r * abs(loss0 - loss)


def run(model, data, out, bf16, capability, opts) -> list:
    "The per-step training losses of one `qlora-nb train` run in its own process."
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    if capability != "default": env["ATEN_CPU_CAPABILITY"] = capability
    argv = [sys.executable, "-m", "qlora_nb", "train", "--model_name_or_path", str(model), "--dataset", str(data),
            "--dataset_format", "alpaca", "--output_dir", str(out), "--start_over", "--use_cpu",
            "--max_steps", str(opts.steps), "--per_device_train_batch_size", str(opts.batch_size),
            "--gradient_accumulation_steps", "1", "--source_max_len", "128", "--target_max_len", "128",
            "--lora_r", "16", "--lora_alpha", "16", "--learning_rate", str(opts.lr), "--warmup_steps", "0",
            "--logging_steps", "1", "--save_strategy", "no", "--do_eval", "false", "--seed", "0",
            "--disable_tqdm", "true"] + (["--bf16"] if bf16 else [])
    log = out.with_suffix(".log"); out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f: rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc: raise SystemExit(f"{'bf16' if bf16 else 'fp32'} run under {capability} failed ({rc}): see {log}")
    history = json.loads((out/"trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="high enough that the loss moves within the steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--capabilities", default="avx512,avx2", help="torch kernel sets (ATEN_CPU_CAPABILITY), or default")
    opts = p.parse_args(argv)
    from qlora_nb.sources import known_model_folder
    from qlora_nb.tiny import make_alpaca_records
    model = known_model_folder("smollm2-135m-instruct")
    if not (model/"config.json").exists(): print("skipped: SmolLM2-135M-Instruct is not cached (qlora-nb get-model)"); return 0
    config = json.loads((model/"config.json").read_text())
    layers, r = config["num_hidden_layers"], update_rounding_share(config["hidden_size"], opts.lr)
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK/"alpaca-400.json"; data.write_text(json.dumps(make_alpaca_records(400, seed=0)))
    print(f"u = 2^-8, n = 8 x {layers} + 2 = {roundings_per_logit(layers)} roundings per logit, "
          f"sqrt(n) u = {math.sqrt(roundings_per_logit(layers)) * U_BF16:.4f} (relative); r = {r:.3f}")
    failed, results = False, {}
    for cap in opts.capabilities.split(","):
        fp32 = run(model, data, WORK/f"{cap}-fp32", False, cap, opts)
        bf16 = run(model, data, WORK/f"{cap}-bf16", True, cap, opts)
        rows = [(t, a, b, b - a, tolerance(fp32[0], a, layers, r)) for t, (a, b) in enumerate(zip(fp32, bf16), 1)]
        worst = max(abs(d) / tol for *_, d, tol in rows)
        failed |= worst > 1
        results[cap] = dict(fp32=fp32, bf16=bf16, worst_share=worst)
        print(f"\nkernel set {cap}: step | fp32 loss | bf16 loss | bf16 - fp32 | tolerance")
        for t, a, b, d, tol in rows: print(f"  {t:3d} | {a:.4f} | {b:.4f} | {d:+.4f} | {tol:.4f}{'' if abs(d) <= tol else '  OUT'}")
        print(f"  largest |difference| / tolerance: {worst:.2f}; fp32 went {fp32[0]:.3f} -> {fp32[-1]:.3f}, "
              f"bf16 {bf16[0]:.3f} -> {bf16[-1]:.3f}")
    (WORK/"results.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__": sys.exit(main())
