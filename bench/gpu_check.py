"""GPU check (issue 7): QLoRA vs 16-bit LoRA on a ~1B-parameter Llama built from a config, no download.

Run through `bash bench/gpu_check.sh` on a machine with one CUDA GPU (under 8 minutes on an H100-class card).
`python bench/gpu_check.py --smoke` runs the same steps on a tiny model on the CPU, to check the script itself.
Prints a table last: tokens/s, peak GPU memory, weight bits per parameter, and the memory estimate vs the peak."""
import argparse, gc, json, os, sys, tempfile, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_nb.config import parse_args
from qlora_nb.lora import dtype_table
from qlora_nb.quant import load_base_model
from qlora_nb.tiny import make_alpaca_records, make_tiny_tokenizer, tiny_model_path
from qlora_nb.train import train
from qlora_nb.widgets import estimate_memory

ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # TinyLlama-1.1B's shape

def build_model(folder: Path, smoke: bool) -> Path:
    "A random Llama saved like a hub model, with the tiny tokenizer (its ids fit any vocabulary)."
    if smoke: return tiny_model_path()
    if (folder/"config.json").exists(): return folder
    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(**ONE_B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"): model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder); tok.save_pretrained(folder)
    del model; torch.cuda.empty_cache()
    return folder

def run_flags(model, data, out, bits, steps, smoke) -> list:
    flags = ["--model_name_or_path", str(model), "--dataset", str(data), "--dataset_format", "alpaca",
             "--output_dir", str(out), "--bits", str(bits), "--max_steps", str(steps), "--save_strategy", "no",
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--source_max_len", "256",
             "--target_max_len", "256", "--lora_r", "64", "--logging_steps", "5", "--include_num_input_tokens_seen",
             "True", "--report_to", "none", "--start_over"]
    return flags + (["--use_cpu"] if smoke else ["--bf16"])

def measure(flags: list) -> dict:
    "Train once; input tokens/s (padding included; batches are length-grouped), seconds per step, peak GPU memory."
    cuda = torch.cuda.is_available()
    if cuda: torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = train(flags)
    seconds = time.perf_counter() - t0
    args = parse_args(flags, quiet=True)
    state = json.loads((Path(args.output_dir)/"trainer_state.json").read_text())
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    gc.collect(); cuda and torch.cuda.empty_cache()
    return dict(tokens_per_s=state["num_input_tokens_seen"] / metrics["train_runtime"],
                s_per_step=metrics["train_runtime"] / args.max_steps, peak_bytes=peak, wall_s=seconds,
                estimate=sum(estimate_memory(str(args.model_name_or_path), args).values()))

def weight_bits(model_path, smoke) -> float:
    "Bits per parameter of the 4-bit linear weights, measured on the loaded model."
    model = load_base_model(parse_args(["--model_name_or_path", str(model_path)] + (["--use_cpu"] if smoke else ["--bf16"]), quiet=True))
    rows = [r for r in dtype_table(model) if r["dtype"] in ("nf4", "fp4")]
    del model; gc.collect()
    return 8 * sum(r["bytes"] for r in rows) / sum(r["params"] for r in rows)

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing real")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default=None, help="folder for the model and runs (default: a temporary folder)")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available(): sys.exit("gpu_check needs a CUDA GPU (or --smoke).")
    work = Path(a.work or tempfile.mkdtemp(prefix="qlora-nb-gpu-check-"))
    data = work/"alpaca.json"; data.write_text(json.dumps(make_alpaca_records(400, seed=1)))
    model = build_model(work/"llama-1b", a.smoke)
    steps = 4 if a.smoke else a.steps
    rows = {f"{name}": measure(run_flags(model, data, work/name, bits, steps, a.smoke)) for name, bits in [("qlora-4bit", 4), ("lora-bf16", 16)]}
    bits = weight_bits(model, a.smoke)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    print(f"\nGPU check on {device}: {model}")
    print(f"{'run':<12} {'tokens/s':>10} {'s/step':>8} {'peak GiB':>9} {'estimate GiB':>13} {'est/peak':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} {r['peak_bytes'] / 2**30:>9.2f} "
              f"{r['estimate'] / 2**30:>13.2f} {r['estimate'] / r['peak_bytes']:>9.2f}")
    print(f"4-bit weight bits per parameter: {bits:.3f} (expected 4.127 for NF4 with double quantization)")

if __name__ == "__main__":
    main()
