"""GPU check (issue 7): QLoRA vs 16-bit LoRA on a ~1B-parameter Llama built from a config, no download.

Run through `bash bench/gpu_check.sh` on a machine with one CUDA GPU (under 8 minutes on an H100-class card).
`python bench/gpu_check.py --smoke` runs the same steps on a tiny model on the CPU, to check the script itself.
The QLoRA run is repeated under FSDP (`accelerate launch --config_file qlora_nb/configs/fsdp_qlora.yaml`, one process here):
the 4-bit weights stored in bfloat16 wrapped by FSDP, trained, and the adapter saved and loaded back with peft.
Prints a table last: tokens/s, peak GPU memory, weight bits per parameter, and the memory estimate vs the peak."""
import argparse, gc, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_nb.config import parse_args
from qlora_nb.lora import dtype_table
from qlora_nb.quant import load_base_model
from qlora_nb.tiny import make_alpaca_records, make_tiny_tokenizer, tiny_model_path
from qlora_nb.train import train
from qlora_nb.memory import estimate_memory

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

def fsdp_run(flags: list, out: Path, smoke: bool) -> dict:
    "`measure` in a process launched the way qlora_nb/configs/fsdp_qlora.yaml says, with one process; then load the adapter."
    result = out.parent/f"{out.name}.json"
    config = ["--cpu"] if smoke else ["--config_file", "qlora_nb/configs/fsdp_qlora.yaml"]  # FSDP needs a GPU: smoke checks the rest
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "1", __file__, "--worker", str(result), "--"] + flags
    print("==>", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    from peft import PeftConfig
    PeftConfig.from_pretrained(out/"adapter_model")  # the saved adapter is one peft reads
    from safetensors.torch import load_file
    weights = load_file(out/"adapter_model"/"adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values()), "FSDP saved an empty or non-finite adapter"
    return json.loads(result.read_text())

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
    ap.add_argument("--no_fsdp", action="store_true", help="skip the FSDP run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # inside the FSDP launch: measure, write here
    a, rest = ap.parse_known_args()
    if a.worker:
        r = measure(rest[1:] if rest[:1] == ["--"] else rest)
        if int(os.environ.get("RANK", 0)) == 0: Path(a.worker).write_text(json.dumps(r))
        return
    if not a.smoke and not torch.cuda.is_available(): sys.exit("gpu_check needs a CUDA GPU (or --smoke).")
    work = Path(a.work or tempfile.mkdtemp(prefix="qlora-nb-gpu-check-")); work.mkdir(parents=True, exist_ok=True)
    data = work/"alpaca.json"; data.write_text(json.dumps(make_alpaca_records(400, seed=1)))
    model = build_model(work/"llama-1b", a.smoke)
    steps = 4 if a.smoke else a.steps
    rows = {f"{name}": measure(run_flags(model, data, work/name, bits, steps, a.smoke)) for name, bits in [("qlora-4bit", 4), ("lora-bf16", 16)]}
    fsdp_error = None
    if not a.no_fsdp:
        try: rows["qlora-fsdp"] = fsdp_run(run_flags(model, data, work/"qlora-fsdp", 4, steps, a.smoke), work/"qlora-fsdp", a.smoke)
        except (subprocess.CalledProcessError, AssertionError, OSError) as e: fsdp_error = e  # the other rows still print
    bits = weight_bits(model, a.smoke)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    print(f"\nGPU check on {device}: {model}")
    print(f"{'run':<12} {'tokens/s':>10} {'s/step':>8} {'peak GiB':>9} {'estimate GiB':>13} {'est/peak':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} {r['peak_bytes'] / 2**30:>9.2f} "
              f"{r['estimate'] / 2**30:>13.2f} {r['estimate'] / r['peak_bytes']:>9.2f}")
    print(f"4-bit weight bits per parameter: {bits:.3f} (expected 4.127 for NF4 with double quantization)")
    if fsdp_error: sys.exit(f"qlora-fsdp FAILED (its log is above): {fsdp_error}")

if __name__ == "__main__":
    main()
