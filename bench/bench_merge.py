"""Merge memory benchmark: `qlora-nb merge` works shard by shard, so its peak memory should stay near one shard plus the
adapter above the process's baseline, not the size of the model.

    python bench/bench_merge.py                       # a ~440 MB float32 Llama in 50 MB shards, LoRA r=16 everywhere
    python bench/bench_merge.py --layers 24 --shard 100MB --into original

It builds a Llama from a config (random weights, float32 safetensors shards, the tiny model's tokenizer) and a LoRA
adapter with random non-zero A and B on every linear layer (with a run folder's metrics.json saying 4-bit NF4 with
double quantization, as a qlora-nb run records it), then runs `qlora-nb merge --no_report` in a child process that
samples its own resident memory (/proc/self/statm, every 5 ms) from the end of its imports (the baseline) to the end
of the merge. It is a benchmark, not a test.
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = """import json, os, sys, threading, time
import torch; torch.set_num_threads(2)
from qlora_nb.cli import merge_main
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # resident now, not the peak of the imports
baseline, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
start = time.time()
status = merge_main(sys.argv[1:])
done.set(); seconds = time.time() - start
print(json.dumps({"status": status, "baseline": baseline, "peak": max(peak[0], rss()), "seconds": seconds}))"""


def build_base(folder: Path, args) -> Path:
    "A random Llama of the asked shape saved as float32 shards, with the tiny model's tokenizer."
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from qlora_nb.tiny import tiny_model_path
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=args.shard)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(folder)
    return folder


def build_adapter(run: Path, base: Path, args) -> Path:
    "A LoRA adapter folder (peft's file names and keys) with random non-zero A and B on every linear layer of `base`."
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    shapes = {}
    for shard in base.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            shapes |= {k: f.get_slice(k).get_shape() for k in f.keys()}
    g, tensors = torch.Generator().manual_seed(1), {}
    for key, (out, inp) in ((k, s) for k, s in shapes.items() if k.split(".")[-2] in TARGETS):
        prefix = "base_model.model." + key.removesuffix(".weight")
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(args.r, inp, generator=g) / inp ** 0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, args.r, generator=g) * 0.01
    folder = run/"adapter_model"; folder.mkdir(parents=True)
    save_file(tensors, str(folder/"adapter_model.safetensors"), metadata={"format": "pt"})
    (folder/"adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.r, "lora_alpha": 2 * args.r, "lora_dropout": 0.0,
        "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": str(base)}))
    (run/"metrics.json").write_text(json.dumps({"config": {"training": {
        "bits": 4, "quant_type": "nf4", "double_quant": True, "bf16": False, "fp16": False}}}))
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768); p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12); p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--shard", default="50MB"); p.add_argument("--r", type=int, default=16)
    p.add_argument("--into", default="dequantized"); p.add_argument("--dtype", default="fp32")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_base(tmp/"base", args)
        adapter = build_adapter(tmp/"run", base, args)
        flags = ["--adapter", str(tmp/"run"), "--output_dir", str(tmp/"merged"), "--into", args.into,
                 "--dtype", args.dtype, "--no_report"]
        res = subprocess.run([sys.executable, "-c", CHILD, *flags], env=ENV, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        m = json.loads(res.stdout.strip().splitlines()[-1])
        shards = sorted(base.glob("*.safetensors"), key=lambda s: s.stat().st_size)
        mb = lambda n: n / 2 ** 20
        model, largest = sum(s.stat().st_size for s in shards), shards[-1].stat().st_size
        adapter_size = (adapter/"adapter_model.safetensors").stat().st_size
        above = m["peak"] - m["baseline"]
        merged = sum(s.stat().st_size for s in (tmp/"merged").glob("*.safetensors"))
        print(f"model {mb(model):.0f} MB in {len(shards)} float32 shards (largest {mb(largest):.1f} MB); adapter "
              f"{mb(adapter_size):.1f} MB (r={args.r}); merged --into {args.into} --dtype {args.dtype}: {mb(merged):.0f} MB "
              f"in {m['seconds']:.1f} s")
        print(f"peak RSS above baseline: {mb(above):.0f} MB = {above / model:.2f}x the model, {above / largest:.2f}x the "
              f"largest shard, {(above - adapter_size) / largest:.2f}x the largest shard once the adapter is taken off "
              f"(baseline after imports {mb(m['baseline']):.0f} MB)")


if __name__ == "__main__":
    main()
