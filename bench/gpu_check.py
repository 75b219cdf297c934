"""GPU check at real sizes (issue 16): qlora-nb vs TRL's SFTTrainer on Llama-3 shapes, side by side in one run.

    bash bench/gpu_check.sh                      # on the GPU machine (installs the wheelhouse, then runs this)
    python bench/gpu_check.py --plan             # no GPU needed: every configuration's settings and memory estimate
    python bench/gpu_check.py --smoke            # the whole script on the CPU with the tiny model, a few steps
    python bench/gpu_check.py --notebook NB      # a notebook's cells with its `#| cuda` ones (no nbdev needed)

Models: random-weight Llamas built from the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B
(qlora_nb/presets/models.yaml, no download), with the tiny BPE tokenizer (ids < 32000 fit the 128256 vocabulary).
Data: synthetic Alpaca records tokenized and packed by qlora-nb's own pipeline (`make_data_module` with `--packing`)
into rows of ROW tokens; qlora-nb reads the records file (`--dataset`, `--packing`), TRL gets the very same packed rows
pre-tokenized (input_ids, labels, seq_lengths; `skip_prepare_dataset`) and trains on them padding-free (its best
setting: each batch flattened into one row, examples told apart by position ids), so both see the same tokens.
Configurations, each in its own process (its peak memory is its own), with and without Liger kernels
(transformers' `use_liger_kernel`), with SDPA and, where the flash-attn package is installed, flash attention 2:
  qlora-nb 4-bit      `qlora-nb train --bits 4 --bf16 --packing ...` (NF4, double quantization)
  qlora-nb bf16 LoRA  the same with --bits 16
  trl 4-bit           SFTTrainer + peft LoRA on the same 4-bit NF4 base (BitsAndBytesConfig as qlora-nb's), padding-free
Same for all: LoRA r 64 / alpha 16 / dropout 0 on every linear layer but lm_head, the same rows and order seed, B rows
per optimizer step (no accumulation), optimizer paged_adamw_32bit (qlora.py's), lr 2e-4 constant, max_grad_norm 0.3,
activation checkpointing on, bf16, no checkpoint saving. B is the largest batch whose memory estimate for the
bf16-LoRA configuration (the largest) fills --fill of the GPU, capped at --max_tokens tokens per step.
Figures over the steps after --warmup: real (non-pad) tokens/s, peak GPU memory (torch max_memory_allocated, and
reserved), qlora_nb.memory.estimate_memory against that peak, and MFU = 6 x N x tokens/s / the GPU's dense bf16 peak
(N: the weights of the matrix multiplies, lm_head included; 6 = forward 2 + input gradients 2 + the recomputed
forward 2, no base-weight gradients under LoRA, 4 without recomputation; attention's own FLOPs not counted).
Each configuration then runs one more step under torch.profiler (untimed; `--no_profile`): GPU kernel time by group.
Then FSDP-QLoRA (qlora_nb/configs/fsdp_qlora.yaml, one process): train with checkpoints, load the saved adapter with
peft, and resume from the FSDP checkpoint in a fresh folder; the resumed adapter is compared with the straight run's.
The worker processes, the step observer and the token count are bench/harness.py's, shared with bench/bench_train.py.
"""
import argparse, importlib.util, json, math, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

from harness import (ROOT, WORKER, Observer, child_env, nf4_config, run_qlora_nb, run_worker,  # bench/harness.py
                     train_trl, worker_main)

MODELS = {"1B": "meta-llama/Llama-3.2-1B", "3B": "meta-llama/Llama-3.2-3B", "8B": "meta-llama/Llama-3.1-8B"}
Q4, BF16, TRL = "qlora-nb 4-bit", "qlora-nb bf16 LoRA", "trl 4-bit"
KINDS = [Q4, TRL, BF16]  # in this order: the two the goals compare come first (a run cut short by --budget_s keeps them)
LORA = dict(lora_r=64, lora_alpha=16, lora_dropout=0.0)
OPTIM = "paged_adamw_32bit"
# dense bf16 tensor-core peak, without sparsity, by device name (SXM parts; an H100 PCIe is 756)
PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("A100", 312.0)]


class Stopped(Exception):
    "SIGTERM (an outer `timeout`) in the harness: print the table of what finished, then end."


# ---------------------------------------------------------------------------------------------------------------------
# Inside a worker process (bench/harness.py's Observer watches it): the three kinds of run

def qlora_nb_argv(spec: dict) -> list:
    "The `qlora-nb train` command line of a configuration."
    half = spec["row_len"] // 2  # packed rows hold source_max_len + target_max_len tokens
    argv = ["train", "--model_name_or_path", spec["model"], "--dataset", spec["data"], "--dataset_format", "alpaca",
            "--output_dir", spec["output_dir"], "--bits", spec["bits"], "--packing", "--source_max_len", half,
            "--target_max_len", spec["row_len"] - half, "--max_steps", spec["steps"],
            "--per_device_train_batch_size", spec["batch"], "--gradient_accumulation_steps", 1,
            "--lora_r", LORA["lora_r"], "--lora_alpha", LORA["lora_alpha"], "--lora_dropout", LORA["lora_dropout"],
            "--optim", OPTIM, "--learning_rate", 2e-4, "--lr_scheduler_type", "constant", "--max_grad_norm", 0.3,
            "--activation_checkpointing", "True", "--logging_steps", 1, "--report_to", "none", "--seed", 42]
    argv += ["--save_strategy", "steps", "--save_steps", spec["save_steps"]] if spec.get("save_steps") else \
            ["--save_strategy", "no"]
    if not spec.get("resume"): argv.append("--start_over")
    argv += ["--bf16"] if spec["cuda"] else ["--use_cpu"]
    if spec["liger"]: argv += ["--use_liger_kernel", "True"]
    return [str(a) for a in argv]


def run_trl(spec: dict):
    "TRL's SFTTrainer on qlora-nb's packed rows, padding-free, with the same 4-bit base and LoRA."
    import torch
    from datasets import load_from_disk
    from trl import SFTConfig
    rows = load_from_disk(spec["rows"])
    cuda = spec["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32  # the CPU smoke computes in fp32
    args = SFTConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     gradient_accumulation_steps=1, optim=OPTIM, learning_rate=2e-4, lr_scheduler_type="constant",
                     max_grad_norm=0.3, weight_decay=0.0, warmup_steps=0.03, activation_checkpointing=True,
                     logging_steps=1, save_strategy="no", report_to="none", seed=42, bf16=cuda, use_cpu=not cuda,
                     padding_free=True, packing=False, max_length=None, use_liger_kernel=spec["liger"],
                     train_sampling_strategy="group_by_length", length_column_name="length",  # as qlora-nb's default
                     dataset_kwargs={"skip_prepare_dataset": True},  # the rows are tokenized, labelled and packed
                     model_init_kwargs=dict(quantization_config=nf4_config(dtype), dtype=dtype,
                                            device_map={"": 0} if cuda else {"": "cpu"}))
    train_trl(spec["model"], args, rows, **LORA, fp32=not cuda)


def worker(spec: dict) -> dict:
    "One configuration in this (fresh) process (run_worker started it): its figures."
    profile = bool(spec.get("profile"))  # then one step more, under torch.profiler, after the timed ones
    obs = Observer(); obs.install(weight_bits=spec["kind"] == Q4, profile_step=spec["steps"] + 1 if profile else None)
    run = spec | dict(steps=spec["steps"] + profile)
    if spec["kind"] == TRL: run_trl(run)
    else: run_qlora_nb(qlora_nb_argv(run))
    return obs.result(spec["warmup"], upto=spec["steps"])


# ---------------------------------------------------------------------------------------------------------------------
# The plan: models, rows, batches, configurations, estimates (no GPU needed)

def gpu_facts(opts) -> dict:
    "Name, memory and dense bf16 peak of the GPU (or what --gpu_gib / --peak_tflops say, for a plan without one)."
    import torch
    if torch.cuda.is_available() and not opts.plan:
        p = torch.cuda.get_device_properties(0)
        name, gib = p.name, p.total_memory / 2**30
    else: name, gib = ("cpu (smoke)" if opts.smoke else f"{opts.gpu_name} (planned)"), opts.gpu_gib
    peak = opts.peak_tflops or next((t for key, t in PEAK_TFLOPS if key in name), None)
    how = (f"--peak_tflops {opts.peak_tflops:g}" if opts.peak_tflops else
           f"{peak:g} TFLOP/s dense bf16, assumed from the name {name!r} (SXM part)" if peak else
           f"unknown for {name!r}: give --peak_tflops")
    return dict(name=name, gib=gib, peak_tflops=peak, peak_how=how)


def model_config(key: str, opts):
    "The transformers config of a planned model (the table's Llama-3 shapes; the tiny model in a smoke run)."
    from qlora_nb.memory import load_model_config, preset_config
    return load_model_config(str(tiny_path())) if opts.smoke else preset_config(MODELS[key])


def tiny_path():
    from qlora_nb.tiny import tiny_model_path
    return tiny_model_path()


def expected_weight_bits(config) -> float:
    "Bits per parameter bitsandbytes stores for the blocks' linear layers (NF4, double quantization), from their shapes."
    from qlora_nb.memory import linear_layer_shapes, quantized_linear_bytes
    shapes = linear_layer_shapes(config).values()
    return 8 * sum(quantized_linear_bytes(i, o, 4, True) for i, o in shapes) / sum(i * o for i, o in shapes)


def matmul_params(config) -> int:
    "Weights of the matrix multiplies per token: the blocks' linear layers and lm_head (tied or not)."
    from qlora_nb.memory import count_parameters_from_config, model_sizes
    n, s = count_parameters_from_config(config), model_sizes(config)
    return n["linear"] + s.vocab * s.hidden


def estimate_flags(kind: str, batch: int, row_len: int, cuda_like: bool) -> list:
    "The settings `estimate_memory` reads, as `qlora-nb train` flags (a plan: no device check)."
    half = row_len // 2
    return ["--bits", "16" if kind == BF16 else "4", "--per_device_train_batch_size", str(batch), "--source_max_len",
            str(half), "--target_max_len", str(row_len - half), "--lora_r", str(LORA["lora_r"]), "--optim", OPTIM,
            "--activation_checkpointing", "True"] + (["--bf16"] if cuda_like else [])


def estimate_bytes(config, kind, batch, row_len, cuda_like) -> float:
    from qlora_nb.memory import estimate_memory
    return float(sum(estimate_memory(config, estimate_flags(kind, batch, row_len, cuda_like)).values()))


def fill_batch(config, row_len: int, opts, gib: float) -> int:
    "The largest batch (rows per step) whose bf16-LoRA estimate fits --fill of the GPU, at most --max_tokens a step."
    if opts.smoke: return opts.batch or 2
    if opts.batch: return opts.batch
    best = 1
    for b in range(1, max(1, opts.max_tokens // row_len) + 1):
        if estimate_bytes(config, BF16, b, row_len, True) <= opts.fill * gib * 2**30: best = b
        else: break
    return best


def attentions(opts) -> tuple:
    "(attention implementations to run, a note on flash attention)."
    have = importlib.util.find_spec("flash_attn") is not None
    asked = [a.strip() for a in opts.attn.split(",")]
    if "auto" in asked: asked = ["sdpa", "flash"]
    if opts.smoke: return ["sdpa"], "flash attention: not tried in a smoke run (CPU)"
    if "flash" in asked and not have:
        return [a for a in asked if a != "flash"] or ["sdpa"], (
            "flash attention: the flash-attn package is not installed (the registry has only its source, which "
            "builds with nvcc against the installed torch or fetches a prebuilt wheel from GitHub: not offline): "
            "SDPA only")
    return asked, "flash attention: flash-attn " + ("installed" if have else "not asked")


def liger_reason(opts) -> str | None:
    "Why the Liger configurations cannot run here, or None."
    if opts.liger == "off": return "--liger off"
    if opts.plan: return None  # decided on the machine that runs it
    import torch
    if not torch.cuda.is_available(): return "Liger kernels need CUDA and triton (this is a CPU run)"
    for mod in ("triton", "liger_kernel"):
        if importlib.util.find_spec(mod) is None: return f"the {mod.replace('_', '-')} package is not installed"
    return None


def trl_reason(opts) -> str | None:
    return None if opts.plan or importlib.util.find_spec("trl") else "trl is not installed (pip install trl; pyproject's bench extra)"


def make_plan(opts, gpu: dict) -> list:
    "One entry per configuration: its name, model, row length, batch, attention, Liger, estimate; or why it is skipped."
    from qlora_nb.memory import count_parameters_from_config
    attn, _ = attentions(opts)
    no_liger, no_trl = liger_reason(opts), trl_reason(opts)
    plan = []
    configs = {key: model_config(key, opts) for key in opts.models}
    batches = {(key, r): fill_batch(configs[key], r, opts, gpu["gib"]) for key in opts.models for r in opts.rows}
    ligers = {"auto": [False, True], "off": [False], "only": [True]}[opts.liger]
    for liger in ligers:  # every model without Liger first: a run cut short by --budget_s keeps the main comparison
        for key in opts.models:
            config = configs[key]
            for row_len in opts.rows:
                batch = batches[key, row_len]
                for impl in attn:
                    for kind in opts.kinds:
                        name = kind + (" + liger" if liger else "") + (" [flash]" if impl == "flash" else "")
                        skip = (no_trl if kind == TRL else None) or (no_liger if liger else None)
                        plan.append(dict(name=name, kind=kind, model_key=key, row_len=row_len, batch=batch, attn=impl,
                                         liger=liger, skip=skip, n_matmul=matmul_params(config),
                                         n_params=sum(count_parameters_from_config(config).values()),
                                         expected_bits=expected_weight_bits(config),
                                         estimate=estimate_bytes(config, kind, batch, row_len, not opts.smoke)))
    return plan


def print_plan(plan: list, gpu: dict, opts):
    from qlora_nb.memory import count_parameters_from_config
    print(f"GPU: {gpu['name']}, {gpu['gib']:.0f} GiB; peak: {gpu['peak_how']}")
    print(f"{len([p for p in plan if not p['skip']])} configuration processes (+ 2 FSDP processes unless --no_fsdp); "
          f"{opts.steps} steps each, the first {opts.warmup} untimed; batch: the largest whose bf16-LoRA estimate fills "
          f"{opts.fill:.0%} of the GPU, at most {opts.max_tokens} tokens a step")
    mfu = opts.assume_mfu
    print(f"{'configuration':<34} {'model':<5} {'row':>5} {'batch':>5} {'tok/step':>8} {'estimate GiB':>12} "
          f"{'TFLOP/step':>10} {f's/step @{mfu:.0%} MFU':>15} {'process s (guess)':>17}")
    total = 0.0
    for p in plan:
        tokens, flops = p["row_len"] * p["batch"], 6 * p["n_matmul"] * p["row_len"] * p["batch"]
        secs = flops / (mfu * gpu["peak_tflops"] * 1e12) if gpu["peak_tflops"] else float("nan")
        process = 25 + 3 * 2 * p["n_params"] / 1e9 + opts.steps * secs  # start-up, load + quantize (3 s a GB), steps
        total += 0 if p["skip"] else process
        print(f"{p['name']:<34} {p['model_key']:<5} {p['row_len']:>5} {p['batch']:>5} {tokens:>8} "
              f"{p['estimate'] / 2**30:>12.1f} {flops / 1e12:>10.1f} {secs:>15.2f} {process:>17.0f}" +
              (f"   skipped: {p['skip']}" if p["skip"] else ""))
    builds = sum(10 + 2 * sum(count_parameters_from_config(model_config(k, opts)).values()) / 1e9 / 0.5
                 for k in opts.models)  # random init on the GPU, then writing bf16 safetensors at ~0.5 GB/s
    print(f"rough total: {total + builds:.0f} s (model builds {builds:.0f} s; a guess from an assumed {mfu:.0%} MFU, "
          f"not a measurement); --budget_s {opts.budget_s:g} stops starting configurations after that many seconds")
    first = plan[0]
    spec = dict(model="MODEL", data="DATA.json", output_dir="OUT", bits=4, row_len=first["row_len"], batch=first["batch"],
                steps=opts.steps, cuda=not opts.smoke, liger=False)
    print("qlora-nb 4-bit runs: qlora-nb " + " ".join(qlora_nb_argv(spec)))


# ---------------------------------------------------------------------------------------------------------------------
# The harness: build models and rows once, run each configuration in its own process, print the table

def build_model(key: str, folder: Path) -> Path:
    "A random-weight Llama with the table's shape for `key`, saved in bf16 with the tiny BPE tokenizer (in a subprocess)."
    if (folder/"config.json").exists(): return folder
    code = f"""
import torch, sys
from transformers import LlamaForCausalLM
from qlora_nb.memory import preset_config
from qlora_nb.tiny import make_tiny_tokenizer
tok = make_tiny_tokenizer(vocab_size=32000)  # its ids (< 32000) fit Llama-3's 128256-entry vocabulary
cfg = preset_config({MODELS[key]!r})
cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
torch.manual_seed(0); torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"): model = LlamaForCausalLM(cfg)
model.generation_config.pad_token_id = tok.pad_token_id
model.save_pretrained(sys.argv[1], max_shard_size="5GB"); tok.save_pretrained(sys.argv[1])
"""
    tmp = folder.with_name(folder.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT, env=child_env())
    tmp.rename(folder)
    print(f"built {MODELS[key]}'s shape with random weights into {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def with_attention(folder: Path, impl: str) -> Path:
    "A model folder whose config.json asks for `impl` (flash_attention_2): the weights are links to the original."
    if impl == "sdpa": return folder
    out = folder.with_name(folder.name + "-flash")
    if not out.exists():
        out.mkdir()
        for f in folder.iterdir():
            if f.name != "config.json": (out/f.name).symlink_to(f.resolve())
        cfg = json.loads((folder/"config.json").read_text()) | {"attn_implementation": "flash_attention_2"}
        (out/"config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_records(path: Path, n: int, max_words: int):
    from qlora_nb.tiny import make_alpaca_records
    path.write_text(json.dumps(make_alpaca_records(n, seed=1, max_words=max_words)))


def packed_rows(model: Path, data: Path, row_len: int, batch: int, steps: int, out: Path, cuda: bool) -> dict:
    "qlora-nb's own packed rows of `data` (what `qlora-nb train --packing` trains on), saved for TRL; their counts."
    from qlora_nb.config import parse_args
    from qlora_nb.data import make_data_module
    from qlora_nb.model import base_tokenizer
    spec = dict(model=str(model), data=str(data), output_dir=str(out.parent/"unused"), bits=4, row_len=row_len,
                batch=batch, steps=steps, cuda=False, liger=False)
    args = parse_args(qlora_nb_argv(spec)[1:], quiet=True)  # --use_cpu: the data pipeline is the same on any device
    rows = make_data_module(base_tokenizer(args), args)["train_dataset"]
    def trl_columns(row):  # TRL's padding-free collator rebuilds the position ids from each row's example lengths
        pos = row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return {"seq_lengths": [b - a for a, b in zip(starts, starts[1:])]}
    rows = rows.map(trl_columns).select_columns(["input_ids", "labels", "seq_lengths", "length"])
    shutil.rmtree(out, ignore_errors=True); rows.save_to_disk(str(out))
    lengths = [len(r) for r in rows["input_ids"]]
    return dict(rows=len(lengths), tokens=sum(lengths), fill=sum(lengths) / (len(lengths) * row_len))


def prepare_data(work: Path, model: Path, row_len: int, batch: int, steps: int, cuda: bool) -> tuple:
    "(records file, rows folder, counts): enough records that the packed rows cover every step of every run."
    need, n = batch * steps, max(64, batch * steps * 4)
    max_words = min(600, max(120, row_len // 4))  # longer rows: longer records too (the tail of the length spread)
    while True:
        data = work/f"alpaca-{n}-{max_words}.json"
        if not data.exists(): write_records(data, n, max_words)
        rows_dir = work/f"rows-{data.stem}-{row_len}"
        counts = packed_rows(model, data, row_len, batch, steps, rows_dir, cuda)
        if counts["rows"] >= need: return data, rows_dir, counts
        n = math.ceil(n * need / max(1, counts["rows"]) * 1.2)


def run_config(spec: dict, work: Path, timeout: float, opts, launcher: list | None = None) -> dict:
    "One configuration in a fresh process (optionally through `accelerate launch`), its files in `work`: figures or error."
    slug = re.sub(r"\W+", "_", spec["name"] + f"_{spec['model_key']}_{spec['row_len']}").strip("_")
    return run_worker(__file__, spec, work/slug, timeout, threads=opts.threads, launcher=launcher)


def fsdp_checks(model: Path, data: Path, opts, work: Path, cuda: bool, left, out: list | None = None) -> list:
    """FSDP-QLoRA in one process: train with checkpoints, load the adapter with peft, resume from a checkpoint.
    Each check's figures go into `out` as it ends (a run stopped from outside keeps them)."""
    from peft import PeftConfig
    from safetensors.torch import load_file
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
              *(["--config_file", str(ROOT/"qlora_nb/configs/fsdp_qlora.yaml")] if cuda else ["--cpu"])]  # FSDP needs a GPU
    steps = 2 * max(2, opts.fsdp_steps // 2)
    base = dict(kind=Q4, model=str(model), model_key=opts.fsdp_model, data=str(data), bits=4, row_len=opts.fsdp_row,
                batch=opts.fsdp_batch, steps=steps, warmup=1, cuda=cuda, liger=False, save_steps=steps // 2)
    straight, resumed = work/"fsdp-straight", work/"fsdp-resumed"
    out = [] if out is None else out
    r = run_config(base | dict(name="fsdp train", output_dir=str(straight)), work, min(opts.timeout, left()), opts, launch)
    if "error" not in r:
        try:
            PeftConfig.from_pretrained(straight/"adapter_model")  # the saved adapter is one peft reads
            weights = load_file(straight/"adapter_model"/"adapter_model.safetensors")
            assert weights and all(w.isfinite().all() for w in weights.values()), "empty or non-finite adapter"
        except Exception as e: r = dict(error=f"the adapter saved under FSDP does not load: {e}")
    out.append(("qlora-nb 4-bit under FSDP", r))
    half = straight/f"checkpoint-{steps // 2}"
    if "error" in r or not half.is_dir():
        out.append(("resume from an FSDP checkpoint", dict(error=f"no {half.name} to resume from")))
        return out
    shutil.rmtree(resumed, ignore_errors=True); resumed.mkdir()
    shutil.copytree(half, resumed/half.name)  # a run stopped after its first checkpoint
    layout = "sharded (pytorch_model_fsdp_0/)" if (half/"pytorch_model_fsdp_0").is_dir() else "plain"
    if left() < 60:  # 2026-12-04: a resume started with 24 s left was cut off before it printed a line (no verdict)
        out.append((f"resume from checkpoint-{steps // 2} ({layout})",
                    dict(error=f"not started: {max(0, left()):.0f} s of --budget_s left (it needs about a minute)")))
        return out
    r2 = run_config(base | dict(name="fsdp resume", output_dir=str(resumed), resume=True), work,
                    max(1, min(opts.timeout, left())), opts, launch)
    if "error" not in r2:
        a = load_file(straight/"adapter_model"/"adapter_model.safetensors")
        b = load_file(resumed/"adapter_model"/"adapter_model.safetensors")
        r2["adapter_max_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("nan")
        state = json.loads((resumed/"trainer_state.json").read_text()) if (resumed/"trainer_state.json").exists() else {}
        r2["resumed_steps"] = f"{steps // 2} -> {state.get('global_step', '?')}"
    r2["layout"] = layout
    out.append((f"resume from checkpoint-{steps // 2} ({layout})", r2))
    return out


def gib(x): return "n/a" if x is None else f"{x / 2**30:.2f}"


def print_table(results: list, gpu: dict, fsdp: list, notes: list, opts):
    "The side-by-side table, then the goals computed from it."
    cuda = not opts.smoke
    print(f"\nGPU check on {gpu['name']}; MFU peak: {gpu['peak_how']}")
    for n in notes: print(f"- {n}")
    head = (f"{'configuration':<34} {'model':<5} {'row x B':>9} {'tok/step':>8} {'tokens/s':>9} {'s/step':>7} {'MFU':>6} "
            f"{'peak GiB':>8} {'resv GiB':>8} {'est GiB':>8} {'est/peak':>8} {'loss':>7}")
    print(head); print("-" * len(head))
    for p, r in results:
        where = f"{p['model_key']:<5} {str(p['row_len']) + ' x ' + str(p['batch']):>9}"
        if p["skip"]: print(f"{p['name']:<34} {where}   skipped: {p['skip']}"); continue
        if "error" in r: print(f"{p['name']:<34} {where}   FAILED: {r['error']}"); continue
        peak = r["peak_bytes"] if cuda else None
        mfu = (6 * p["n_matmul"] * r["real_tok_s"] / (gpu["peak_tflops"] * 1e12)) if gpu["peak_tflops"] and cuda else None
        ratio = "n/a" if not peak else f"{p['estimate'] / peak:.2f}"
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.3f}"
        print(f"{p['name']:<34} {where} {r['real_tokens'] / max(1, r['timed_steps']):>8.0f} {r['real_tok_s']:>9.0f} {r['s_per_step']:>7.3f} "
              f"{'n/a' if mfu is None else f'{mfu:.1%}':>6} {gib(peak):>8} {gib(r['reserved_bytes'] if cuda else None):>8} "
              f"{p['estimate'] / 2**30:>8.2f} {ratio:>8} {loss:>7}")
    if not cuda: print("(CPU smoke: no GPU memory to compare the estimate with; peak RSS per process: " +
                       ", ".join(f"{gib(r['peak_rss_mb'] * 2**20)}" for p, r in results if not p["skip"] and "error" not in r) + " GiB)")
    print("\nGoals (computed from the rows above):")
    groups = {}
    for p, r in results:
        if not p["skip"] and "error" not in r: groups.setdefault((p["model_key"], p["row_len"], p["attn"]), []).append((p, r))
    for (key, row_len, impl), rows in groups.items():
        ours = [(p, r) for p, r in rows if p["kind"] == Q4]
        trl = [(p, r) for p, r in rows if p["kind"] == TRL]
        tag = f"{key}, rows of {row_len}, {impl}"
        if ours and trl:
            (po, ro), (pt, rt) = max(ours, key=lambda x: x[1]["real_tok_s"]), max(trl, key=lambda x: x[1]["real_tok_s"])
            ratio = ro["real_tok_s"] / rt["real_tok_s"]
            print(f"- {tag}: tokens/s {po['name']} / best TRL ({pt['name']}): {ratio:.2f}x "
                  f"({'no slower than TRL' if ratio >= 1 else 'SLOWER than TRL'})")
            if cuda: print(f"- {tag}: peak memory {po['name']} / {pt['name']}: {ro['peak_bytes'] / rt['peak_bytes']:.2f}x "
                           f"({gib(ro['peak_bytes'])} vs {gib(rt['peak_bytes'])} GiB)")
        elif ours: print(f"- {tag}: no TRL row to compare with")
        for p, r in ours:
            if cuda and gpu["peak_tflops"]:
                print(f"- {tag}: MFU {p['name']}: {6 * p['n_matmul'] * r['real_tok_s'] / (gpu['peak_tflops'] * 1e12):.1%} "
                      f"(6 x {p['n_matmul'] / 1e9:.2f}B matmul weights x tokens/s / {gpu['peak_tflops']:g} TFLOP/s)")
            if r.get("weight_bits"): print(f"- {tag}: 4-bit weight bits per parameter: {r['weight_bits']:.3f} "
                                           f"({p['expected_bits']:.3f} expected from the layer shapes, NF4 with double quantization)")
        if cuda:
            off = [(p["name"], p["estimate"] / r["peak_bytes"]) for p, r in rows if r.get("peak_bytes")]
            ok = [n for n, x in off if abs(x - 1) <= 0.10]
            print(f"- {tag}: memory estimate within 10 % of the peak: {len(ok)} of {len(off)} "
                  f"({', '.join(f'{n} {x:.2f}' for n, x in off)})")
    if not cuda: print("- smoke run: tokens/s ratios are printed above; MFU and the estimate against the peak need a GPU")
    profiled = [(p, r) for p, r in results if not p["skip"] and "error" not in r and r.get("profile")]
    if profiled:
        print("\nWhere the time goes (torch.profiler over one more step after the timed ones; kernel time by group, "
              "busy = the step's kernel time / the timed s/step, the GPU idles the rest):")
    for p, r in profiled:
        f = r["profile"]
        if "error" in f: print(f"- {p['name']} ({p['model_key']}): profile failed: {f['error']}"); continue
        total = f["kernel_s"] or float("nan")
        what = "kernels" if f["device"] == "cuda" else "CPU ops' self time"
        print(f"- {p['name']} ({p['model_key']}): {what} {f['kernel_s']:.3f} s in {f['kernels']} launches, profiled step "
              f"{f['wall_s']:.3f} s, busy {f['kernel_s'] / r['s_per_step']:.0%}; " +
              ", ".join(f"{g} {t / total:.0%}" for g, t in f["groups"].items()))
        print("    top: " + "; ".join(f"{n[:70]} {t / total:.0%}" for n, t in f["top"][:5]))
    if fsdp:
        print("\nFSDP-QLoRA (qlora_nb/configs/fsdp_qlora.yaml, one process)" if cuda else
              "\nFSDP-QLoRA path (smoke: accelerate --cpu, no FSDP; FSDP needs a GPU)")
        for name, r in fsdp:
            if "error" in r: print(f"- {name}: FAILED: {r['error']}"); continue
            extra = "".join(f", {k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f", {k.replace('_', ' ')} {v}"
                            for k, v in r.items() if k in ("adapter_max_diff", "resumed_steps"))
            print(f"- {name}: ok, {r['real_tok_s']:.0f} tokens/s, peak {gib(r['peak_bytes'])} GiB, loss "
                  f"{r['loss'] if r['loss'] is None else round(r['loss'], 4)}{extra}")


def parse_opts(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps: checks the script itself")
    p.add_argument("--plan", action="store_true", help="print every configuration's settings and estimate; run nothing")
    p.add_argument("--models", default="1B,3B,8B", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--rows", default="2048", help="packed row lengths in tokens, comma-separated (e.g. 1024,4096)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from: {', '.join(KINDS)}")
    p.add_argument("--liger", choices=["auto", "off", "only"], default="auto",
                   help="auto: each configuration with and without Liger where Liger can run")
    p.add_argument("--attn", default="auto", help="sdpa, flash, or auto (sdpa, plus flash where flash-attn is installed)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 5; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; smoke 1)")
    p.add_argument("--batch", type=int, default=None, help="rows per step for every configuration (default: fill the GPU)")
    p.add_argument("--fill", type=float, default=0.6, help="share of GPU memory the bf16-LoRA estimate may fill")
    p.add_argument("--max_tokens", type=int, default=32768, help="at most this many tokens per optimizer step")
    p.add_argument("--gpu_gib", type=float, default=139.0, help="GPU memory for --plan without a GPU (H200: about 139)")
    p.add_argument("--gpu_name", default="NVIDIA H200", help="the GPU --plan assumes (for its bf16 peak)")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the name)")
    p.add_argument("--assume_mfu", type=float, default=0.35, help="for --plan's seconds per step only")
    p.add_argument("--budget_s", type=float, default=500,
                   help="every process ends by this many seconds from the start (one device command may run 600 s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration process")
    p.add_argument("--no_fsdp", action="store_true", help="skip the FSDP-QLoRA checks")
    p.add_argument("--fsdp_only", action="store_true", help="only the FSDP-QLoRA checks (no configuration table)")
    p.add_argument("--no_profile", action="store_true",
                   help="no torch.profiler step (by default each configuration runs one more step, untimed, under it)")
    p.add_argument("--fsdp_model", default="1B"); p.add_argument("--fsdp_row", type=int, default=1024)
    p.add_argument("--fsdp_batch", type=int, default=4); p.add_argument("--fsdp_steps", type=int, default=6)
    p.add_argument("--work", default=None, help="folder for models, data, runs and logs (default: bench/_work/gpu_check)")
    o = p.parse_args(argv)
    o.models, o.rows, o.kinds = o.models.split(","), [int(r) for r in o.rows.split(",")], o.kinds.split(",")
    bad = [m for m in o.models if m not in MODELS] + [k for k in o.kinds if k not in KINDS]
    if bad: p.error(f"unknown {bad}; models: {list(MODELS)}; kinds: {KINDS}")
    if o.smoke:
        o.models, o.rows = ["tiny"], [256]
        o.steps, o.warmup = o.steps or 3, 1 if o.warmup is None else o.warmup
        o.fsdp_model, o.fsdp_row, o.fsdp_batch, o.fsdp_steps = "tiny", 256, 2, 4
    o.steps, o.warmup = o.steps or 5, 2 if o.warmup is None else o.warmup
    o.threads = 1 if o.smoke else None  # a smoke run: one torch thread per process, steady on shared cores
    return o


def main(argv=None):
    opts = parse_opts(argv)
    gpu = gpu_facts(opts)
    plan = [] if opts.fsdp_only and not opts.plan else make_plan(opts, gpu)
    if opts.plan: print_plan(plan, gpu, opts); return
    import torch
    cuda = torch.cuda.is_available() and not opts.smoke
    if not opts.smoke and not cuda: sys.exit("gpu_check needs a CUDA GPU (or --smoke, or --plan).")
    t_start = time.perf_counter()
    work = Path(opts.work or ROOT/"bench"/"_work"/("gpu_check_smoke" if opts.smoke else "gpu_check"))
    (work/"runs").mkdir(parents=True, exist_ok=True)
    _, attn_note = attentions(opts)
    notes = [attn_note, f"same for all: LoRA r {LORA['lora_r']} / alpha {LORA['lora_alpha']} / dropout "
             f"{LORA['lora_dropout']} on every linear layer but lm_head, optimizer {OPTIM}, lr 2e-4 constant, activation "
             f"checkpointing on, {'bf16' if cuda else 'fp32 (CPU)'}, {opts.steps} steps, timed after {opts.warmup}; "
             "tokens/s counts real (non-pad) tokens"]
    if (why := liger_reason(opts)) and opts.liger != "off": notes.append(f"Liger configurations skipped: {why}")
    if why := trl_reason(opts): notes.append(f"TRL configurations skipped: {why}")
    models, data = {}, {}
    def model_folder(key):  # built when first needed: a run cut short by --budget_s builds no model it does not use
        if key not in models: models[key] = tiny_path() if opts.smoke else build_model(key, work/f"llama-{key}")
        return models[key]
    results, fsdp, running = [], [], None
    def save():  # after every configuration: a command killed from outside still leaves its figures
        (work/"results.json").write_text(json.dumps(dict(gpu=gpu, notes=notes, results=results, fsdp=fsdp), indent=1,
                                                     default=str))
    def stop(signum, frame): raise Stopped(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, stop)
    try:
        for p in plan:
            if p["skip"]: results.append((p, {})); continue
            left = opts.budget_s - (time.perf_counter() - t_start)
            if left < 30:
                p["skip"] = f"--budget_s {opts.budget_s:g} spent before it could start"; results.append((p, {})); continue
            dk = (p["model_key"], p["row_len"], p["batch"])
            if dk not in data:
                data[dk] = prepare_data(work, model_folder(p["model_key"]), p["row_len"], p["batch"],
                                        opts.steps + (not opts.no_profile), cuda)
                c = data[dk][2]
                notes.append(f"{p['model_key']}, rows of {p['row_len']}: {c['rows']} packed rows, {c['fill']:.1%} full "
                             f"(qlora-nb's packing; TRL trains on the same rows)")
            records, rows_dir, _ = data[dk]
            spec = dict(p, model=str(with_attention(models[p["model_key"]], p["attn"])), data=str(records), rows=str(rows_dir),
                        output_dir=str(work/"runs"/re.sub(r"\W+", "_", f"{p['name']}_{p['model_key']}_{p['row_len']}")),
                        bits=16 if p["kind"] == BF16 else 4, steps=opts.steps, warmup=opts.warmup, cuda=cuda,
                        profile=not opts.no_profile)
            running = p
            r = run_config(spec, work, min(opts.timeout, opts.budget_s - (time.perf_counter() - t_start)), opts)
            running = None
            print(f"[{time.perf_counter() - t_start:5.0f} s] {p['name']:<34} {p['model_key']} {p['row_len']}x{p['batch']}: " +
                  (r["error"] if "error" in r else f"{r['real_tok_s']:.0f} tokens/s, {r['s_per_step']:.3f} s/step, "
                   f"peak {gib(r['peak_bytes'])} GiB, {r['process_s']:.0f} s in all"), flush=True)
            results.append((p, r)); save()
        if not opts.no_fsdp:
            if opts.budget_s - (time.perf_counter() - t_start) < 60:
                fsdp.append(("FSDP checks", dict(error=f"not started: --budget_s {opts.budget_s:g} spent")))
            else:
                key = opts.fsdp_model
                model = model_folder(key)
                records = prepare_data(work, model, opts.fsdp_row, opts.fsdp_batch, opts.fsdp_steps, cuda)[0]
                fsdp_checks(model, records, opts, work, cuda, lambda: opts.budget_s - (time.perf_counter() - t_start), fsdp)
    except Stopped as e:
        notes.append(f"stopped by {e} (an outer timeout?) at {time.perf_counter() - t_start:.0f} s: the rows below are "
                     "what had finished")
        if running is not None: results.append((running, dict(error=f"stopped by {e} while it ran")))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print_table(results, gpu, fsdp, notes, opts); save()
    failed = [p["name"] for p, r in results if "error" in r] + [n for n, r in fsdp if "error" in r]
    print(f"\n{time.perf_counter() - t_start:.0f} s in all; logs in {work}")
    if failed: sys.exit(f"gpu_check: {len(failed)} failed: {', '.join(failed)} (their logs are named above)")


def run_notebook(path: str, flags=("cuda",)) -> int:
    """A notebook's code cells in order in one namespace, as `nbdev-test --flags cuda` runs them (where nbdev is not
    installed: the GPU machine's wheelhouse has no room for it): cells flagged `notest`/`slow`/`cuda` run only when
    `flags` names the flag, `#| eval: false` never; in the notebook's folder, with IN_TEST=1. 0 when every cell passed."""
    import traceback
    nb = Path(path).resolve()
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    os.environ["IN_TEST"] = "1"; os.chdir(nb.parent); sys.path.insert(0, str(ROOT))
    ns, ran, flagged, t0 = {"__name__": "__main__"}, 0, 0, time.perf_counter()
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        marks = {m.strip() for l in src.splitlines() if l.startswith("#|") for m in l[2:].split()}
        if "eval:" in marks and "false" in marks: continue
        tagged = marks & {"notest", "slow", "cuda"}
        if tagged and not tagged <= set(flags): continue
        try: exec(compile(src, f"{nb.name}[code cell {i}]", "exec"), ns)
        except Exception:
            traceback.print_exc()
            print(f"{nb.name}: code cell {i} FAILED ({ran} cells passed before it, {time.perf_counter() - t0:.0f} s)")
            return 1
        ran += 1; flagged += bool(tagged)
    print(f"{nb.name}: {ran} code cells passed, {flagged} of them flagged {'/'.join(flags)} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]: worker_main(worker)
    elif len(sys.argv) > 1 and sys.argv[1] == "--notebook": sys.exit(run_notebook(sys.argv[2]))
    else: main()
