"""Training benchmark: qlora.py's pipeline vs TRL's SFTTrainer vs `qlora-nb train`, side by side in one run.

    python bench/bench_train.py                  # tiny model + a 58M-parameter Llama: about 8.5 minutes on this CPU
    python bench/bench_train.py --models tiny    # the tiny model only (about 2.5 minutes)
    python bench/bench_train.py --rounds 2       # every configuration twice, interleaved; the best round is kept
    python bench/bench_train.py --no-write       # print the table without updating bench/RESULTS.md
    python bench/bench_train.py --models real    # SmolLM2-135M-Instruct (`qlora-nb get-model`), fp32 and bf16 rows:
                                                 # about 25 minutes on this CPU; skipped with one line when not cached

Every configuration trains the same 4-bit NF4 (double quant) base model with the same LoRA adapters on every linear
layer but lm_head, from the same synthetic Alpaca-like records (`qlora_nb.tiny.make_alpaca_records`), with the same
batch size, sequence limits, optimizer, learning-rate schedule, activation checkpointing and number of optimizer
steps, each in a fresh subprocess (so its peak memory is its own) with the same number of torch threads:

  qlora.py            a faithful re-creation of artidoro/qlora's qlora.py: its DataCollatorForCausalLM tokenizes the
                      strings f"{bos}{input}" / f"{output}{eos}" inside the collator at every step, right padding,
                      attention_mask = input_ids != pad, group_by_length on characters, Seq2SeqTrainer.
  trl                 TRL's SFTTrainer on prompt/completion records (loss on the completion only), padded batches,
                      group_by_length.
  trl padding_free    the same, each batch flattened into one row (no padding; examples separated by position ids).
  trl packing         best-fit-decreasing packing into rows of source_max_len + target_max_len tokens.
  qlora-nb            `qlora-nb train ...` exactly as a user types it (qlora_nb.cli.main in the worker process).
  qlora-nb --packing  the same with --packing.
  ... --bf16          the same tool in bfloat16: qlora.py's and qlora-nb's `--bf16` (bf16 compute dtype, bf16 LoRA
                      weights and autocast), TRL's `bf16=True` with a bf16 model and compute dtype.
  qlora-nb --gradient_checkpointing False
                      qlora-nb without activation checkpointing (every other configuration recomputes each block's
                      activations in the backward pass): faster, but it keeps every block's activations, so its peak
                      memory is above the others' (not a candidate for "best" in the ratios).
  qlora-nb every_n_layers 5
                      only every fifth block recomputed (transformers' every_n_layers, through qlora-nb's
                      --activation_checkpointing_kwargs): between the two, in speed and in memory; opt-in (--configs),
                      and not a candidate for "best" either. RESULTS.md, "Where the memory goes", says why.
  ... (full logits)   qlora-nb or qlora-nb --packing with `QLoRATrainer.label_only_loss = False`: lm_head and the
                      cross-entropy at every position, as transformers computes them, instead of only where a label
                      is (same loss and gradients): the measured gain of the label-only loss.

Metrics, over the timed steps (every step after the first `warmup` steps):
  real tok / CPU s  non-padding tokens (prompt + answer of every example: attention_mask == 1, or for packed rows
                    without a mask everything up to the row's last label-bearing token) per CPU second of the worker
                    process. The comparison metric: the cores are shared with other work, and CPU time (one torch
                    thread) depends much less on it than wall time (runs differ by up to 30 % instead of 6x).
  trained tok       label-bearing tokens (labels != -100); real tok / wall s: the same per wall-clock second,
  s per step        CPU and wall seconds per optimizer step (data loading, collation, forward, backward, optimizer),
  pad               share of the batch slots that hold padding,
  peak RSS          the subprocess's peak resident memory (ru_maxrss), and the peak sampled during training only.
The step clock is a TrainerCallback (on_step_end) and the token count a wrapper around Trainer.training_step; both
observe and change nothing (bench/harness.py's Observer, shared with bench/gpu_check.py). It is a benchmark, not a
test: it prints figures and writes its section of bench/RESULTS.md. Data, the larger model, run folders and logs go to
bench/_work/ (git-ignored).
"""
import argparse, datetime, json, os, platform, re, sys, time
from pathlib import Path

from harness import (ROOT, WORKER, Observer, nf4_config, run_qlora_nb, run_worker, train_trl,  # bench/harness.py
                     worker_main)
WORK = ROOT/"bench"/"_work"  # git-ignored: data, the larger model, run folders, logs
RESULTS = ROOT/"bench"/"RESULTS.md"
MARK_START, MARK_END = "<!-- bench_train:start -->", "<!-- bench_train:end -->"
REAL_START, REAL_END = "<!-- bench_train_real:start -->", "<!-- bench_train_real:end -->"  # the real model's section
from qlora_py import QloraPyCollator  # bench/qlora_py.py: qlora.py re-created

FULL, FULL_PACKED = "qlora-nb (full logits)", "qlora-nb --packing (full logits)"
FP32_CONFIGS = ["qlora.py", "trl", "trl padding_free", "trl packing", "qlora-nb", "qlora-nb --packing", FULL, FULL_PACKED]
BF16 = " --bf16"  # a configuration name ending in it: the same tool in bfloat16
NOCKPT = "qlora-nb --gradient_checkpointing False"
# transformers' every_n_layers: only every 5th block recomputed (--activation_checkpointing_kwargs '{"use_reentrant":
# false, "every_n_layers": 5}'), the others keep their activations; opt-in, for the memory trade in RESULTS.md
EVERY5 = "qlora-nb every_n_layers 5"
EVERY5_FLAGS = ["--activation_checkpointing_kwargs", json.dumps({"use_reentrant": False, "every_n_layers": 5})]
COMPILED = "qlora-nb --compile_blocks"  # each decoder block compiled in place; its first (untimed) step compiles
COMPILED5 = "qlora-nb --compile_blocks every_n_layers 5"  # both: the memory compiling saves, spent on recomputing less
CONFIGS = FP32_CONFIGS + [NOCKPT, EVERY5, COMPILED, COMPILED5] + [
    c + BF16 for c in ["qlora.py", "trl", "trl packing", "qlora-nb", "qlora-nb --packing", NOCKPT, EVERY5, COMPILED, COMPILED5]]

# Per model: how it is built, the LoRA rank, and how many steps to run (the larger model's steps take seconds each).
MODELS = {
    "tiny": dict(desc="qlora_nb.tiny.tiny_model_path(): Llama, 2 layers, hidden 64, vocab 512",
                 lora_r=8, batch_size=4, steps=40, warmup=5),
    "larger": dict(desc="Llama built from a config: 8 layers, hidden 512, 8 heads, MLP 1376, vocab 32000 (LLaMA's); "
                        "tokenizer: the tiny BPE trained with room for 32000 tokens",
                   lora_r=64, batch_size=4, steps=5, warmup=1),
    "real": dict(desc="SmolLM2-135M-Instruct (`qlora-nb get-model`): Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, "
                      "MLP 1536, vocab 49152, tied embeddings",
                 lora_r=64, batch_size=4, steps=5, warmup=1,
                 configs=["qlora.py", "trl", "qlora-nb", "qlora-nb --packing", NOCKPT, COMPILED, COMPILED5,
                          "qlora.py --bf16", "trl --bf16", "qlora-nb --bf16", "qlora-nb --packing --bf16", NOCKPT + BF16,
                          COMPILED + BF16, COMPILED5 + BF16]),
}
REAL_MODEL = "smollm2-135m-instruct"  # qlora_nb.sources.KNOWN_MODELS
LARGER = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)


# ---------------------------------------------------------------------------------------------------------------------
# Shared by the qlora.py and TRL workers: qlora.py's Alpaca prompt

ALPACA_PROMPT_DICT = {  # qlora.py's, verbatim
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response: "
    ),
}

def extract_alpaca_dataset(example):
    "qlora.py's Alpaca formatter."
    if example.get("input", "") != "":
        prompt_format = ALPACA_PROMPT_DICT["prompt_input"]
    else:
        prompt_format = ALPACA_PROMPT_DICT["prompt_no_input"]
    return {'input': prompt_format.format(**example)}


# ---------------------------------------------------------------------------------------------------------------------
# (a) qlora.py, re-created (transformers 5 names; the CPU device map; no checkpoint saving, as in every config)



def spec_dtype(spec):
    "The run's float dtype: bfloat16 for a --bf16 configuration, float32 otherwise."
    import torch
    return torch.bfloat16 if spec.get("bf16") else torch.float32


def qlora_py_model(spec):
    "qlora.py's get_accelerate_model for --bits 4, fp32 or --bf16."
    import torch, bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(spec["model"], device_map={"": "cpu"},  # qlora.py: "auto" + per-GPU max_memory
                                                 quantization_config=nf4_config(spec_dtype(spec)), dtype=spec_dtype(spec))
    setattr(model, 'model_parallel', True); setattr(model, 'is_parallelizable', True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.gradient_checkpointing_enable()
    names = {n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} - {"lm_head"}
    model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], target_modules=sorted(names),
                                             lora_dropout=spec["lora_dropout"], bias="none", task_type="CAUSAL_LM"))
    from peft.tuners.lora import LoraLayer
    for name, module in model.named_modules():  # qlora.py's dtype fixes
        if isinstance(module, LoraLayer) and spec.get("bf16"): module.to(torch.bfloat16)
        if 'norm' in name: module.to(torch.float32)
        if ('lm_head' in name or 'embed_tokens' in name) and hasattr(module, 'weight'):
            if spec.get("bf16") and module.weight.dtype == torch.float32: module.to(torch.bfloat16)
    model.config.use_cache = False
    return model


def qlora_py_tokenizer(spec, model):
    "qlora.py's tokenizer set-up (its use_fast=False / tokenizer_type='llama' need a SentencePiece file the fixtures lack)."
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="right")
    assert tokenizer.pad_token is not None, "the benchmark models have a pad token"
    tokenizer.add_special_tokens({  # qlora.py's LLaMA repair ('llama' is in both models' paths)
        "eos_token": tokenizer.convert_ids_to_tokens(model.config.eos_token_id),
        "bos_token": tokenizer.convert_ids_to_tokens(model.config.bos_token_id),
        "unk_token": tokenizer.convert_ids_to_tokens(
            model.config.pad_token_id if model.config.pad_token_id != -1 else tokenizer.pad_token_id)})
    return tokenizer


def common_training_args(spec) -> dict:
    "qlora.py's training defaults (as qlora-nb has them), with this benchmark's batch and steps."
    return dict(output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                gradient_accumulation_steps=1, optim=spec["optim"], learning_rate=2e-4, max_grad_norm=0.3,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0.03, logging_steps=10,
                activation_checkpointing=True, save_strategy="no", report_to="none", use_cpu=True, seed=42,
                bf16=bool(spec.get("bf16")))


def run_qlora_py(spec):
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed
    model = qlora_py_model(spec)
    set_seed(42)
    tokenizer = qlora_py_tokenizer(spec, model)
    dataset = Dataset.from_json(spec["data"])  # qlora.py's local_dataset (its 90/10 split left out: same data for all)
    dataset = dataset.map(extract_alpaca_dataset, remove_columns=['instruction'])
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in ['input', 'output']])
    dataset = dataset.map(lambda x: {'length': len(x['input']) + len(x['output'])})  # group_by_length on characters
    args = Seq2SeqTrainingArguments(**common_training_args(spec), train_sampling_strategy="group_by_length",
                                    remove_unused_columns=False)
    collator = QloraPyCollator(tokenizer, spec["source_max_len"], spec["target_max_len"])
    Seq2SeqTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset, data_collator=collator).train()


# ---------------------------------------------------------------------------------------------------------------------
# (b) TRL's SFTTrainer

def run_trl(spec, packing=False, padding_free=False):
    "TRL's SFTTrainer on prompt/completion records, padded batches (or padding-free, or packed)."
    from datasets import Dataset
    from trl import SFTConfig
    data = Dataset.from_json(spec["data"])
    data = data.map(lambda x: {"prompt": extract_alpaca_dataset(x)["input"], "completion": x["output"]},
                    remove_columns=data.column_names)  # TRL adds the EOS to each completion
    args = SFTConfig(**common_training_args(spec), packing=packing, padding_free=padding_free,
                     # padding_free without packing does not truncate (TRL refuses a max_length): no record is that long
                     max_length=None if padding_free and not packing else spec["source_max_len"] + spec["target_max_len"],
                     train_sampling_strategy="random" if packing else "group_by_length", completion_only_loss=True,
                     model_init_kwargs=dict(quantization_config=nf4_config(spec_dtype(spec)), dtype=spec_dtype(spec),
                                            device_map={"": "cpu"}))
    train_trl(spec["model"], args, data, spec["lora_r"], spec["lora_alpha"], spec["lora_dropout"],
              fp32=not spec.get("bf16"))


# ---------------------------------------------------------------------------------------------------------------------
# (c) qlora-nb train, as a user runs it

def qlora_nb_argv(spec, packing=False) -> list:
    "The `qlora-nb train` command line of this configuration."
    argv = ["train", "--model_name_or_path", spec["model"], "--dataset", spec["data"], "--dataset_format", "alpaca",
            "--output_dir", spec["output_dir"], "--start_over", "--use_cpu", "--max_steps", spec["steps"],
            "--per_device_train_batch_size", spec["batch_size"], "--gradient_accumulation_steps", 1,
            "--source_max_len", spec["source_max_len"], "--target_max_len", spec["target_max_len"],
            "--lora_r", spec["lora_r"], "--lora_alpha", spec["lora_alpha"], "--lora_dropout", spec["lora_dropout"],
            "--optim", spec["optim"], "--save_strategy", "no", "--seed", 42]
    return [str(a) for a in argv] + (["--packing"] if packing else []) + (["--bf16"] if spec.get("bf16") else [])


def run_qlora_nb_full_logits(spec, packing=False):
    "qlora-nb with transformers' loss: lm_head and the cross-entropy at every position."
    from qlora_nb.train import QLoRATrainer
    QLoRATrainer.label_only_loss = False
    run_qlora_nb(qlora_nb_argv(spec, packing))


RUNNERS = {"qlora.py": run_qlora_py, "trl": run_trl,
           "trl padding_free": lambda s: run_trl(s, padding_free=True), "trl packing": lambda s: run_trl(s, packing=True),
           "qlora-nb": lambda s: run_qlora_nb(qlora_nb_argv(s)),
           "qlora-nb --packing": lambda s: run_qlora_nb(qlora_nb_argv(s, packing=True)),
           NOCKPT: lambda s: run_qlora_nb(qlora_nb_argv(s) + ["--gradient_checkpointing", "False"]),
           EVERY5: lambda s: run_qlora_nb(qlora_nb_argv(s) + EVERY5_FLAGS),
           COMPILED: lambda s: run_qlora_nb(qlora_nb_argv(s) + ["--compile_blocks"]),
           COMPILED5: lambda s: run_qlora_nb(qlora_nb_argv(s) + ["--compile_blocks"] + EVERY5_FLAGS),
           FULL: run_qlora_nb_full_logits, FULL_PACKED: lambda s: run_qlora_nb_full_logits(s, packing=True)}


def worker(spec: dict) -> dict:
    "One configuration in this (fresh) process (run_worker started it): its figures."
    import torch
    torch.set_num_threads(spec["threads"])
    observer = Observer(); observer.install()
    config = spec["config"]
    RUNNERS[config.removesuffix(BF16)](spec | dict(bf16=config.endswith(BF16)))
    return observer.result(spec["warmup"])


# ---------------------------------------------------------------------------------------------------------------------
# The harness: build the inputs once, run each configuration in its own subprocess, report

def build_larger_model(path: Path) -> Path:
    "The ~58M-parameter Llama (random weights) and the tiny tokenizer trained with room for 32000 tokens."
    if (path/"config.json").exists(): return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from qlora_nb.tiny import make_tiny_tokenizer
    tok = make_tiny_tokenizer(vocab_size=LARGER["vocab_size"])  # the tiny corpus saturates it below 32000: ids < len(tok)
    cfg = LlamaConfig(**LARGER, tie_word_embeddings=False, initializer_range=0.02, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp); tok.save_pretrained(tmp); tmp.rename(path)
    return path


def prepare(opts) -> dict:
    "{model name: folder}, after writing the data set and building the larger model into bench/_work/."
    from qlora_nb.tiny import make_alpaca_records, tiny_model_path
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK/f"alpaca-{opts.records}.json"
    if not data.exists(): data.write_text(json.dumps(make_alpaca_records(opts.records, seed=0)))
    paths = {"tiny": tiny_model_path(), "larger": WORK/"llama-58m", "real": real_model_folder()}
    if "larger" in opts.models: build_larger_model(paths["larger"])
    if "real" in opts.models and paths["real"] is None:
        print(f"skipping the real model: {REAL_MODEL} is not cached (`qlora-nb get-model` fetches it)", flush=True)
        opts.models.remove("real")
    return data, paths


def real_model_folder() -> Path | None:
    "SmolLM2-135M-Instruct's folder in qlora_nb's cache, or None when `qlora-nb get-model` has not fetched it."
    from qlora_nb.sources import known_model_folder
    folder = known_model_folder(REAL_MODEL)
    return folder if (folder/"config.json").exists() else None


def run_config(config, model_name, model_path, data, opts, round_no=0) -> dict:
    "Run one configuration in a fresh subprocess; its figures, or {'error': ...}."
    m = MODELS[model_name]
    slug = f"{model_name}-" + re.sub(r"\W+", "_", config.replace("-", "")).strip("_")
    spec = dict(config=config, model=str(model_path), data=str(data), output_dir=str(WORK/"runs"/slug),
                threads=opts.threads, batch_size=opts.batch_size or m["batch_size"], steps=opts.steps or m["steps"],
                warmup=m["warmup"] if opts.warmup is None else opts.warmup, optim=opts.optim,
                source_max_len=opts.source_max_len, target_max_len=opts.target_max_len,
                lora_r=m["lora_r"], lora_alpha=16, lora_dropout=0.0)
    (WORK/"logs").mkdir(exist_ok=True)
    r = run_worker(__file__, spec, WORK/"logs"/f"{slug}-round{round_no}", opts.timeout, threads=opts.threads)
    return r if "error" in r else r | dict(spec=spec)


def best_of(runs: list) -> dict:
    "The round with the highest real tokens per CPU second (the least disturbed by other work on the machine)."
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["real_tok_cpu_s"]) | dict(rounds=len(runs)) if ok else runs[-1]


def fmt_row(config, r) -> str:
    if "error" in r: return f"| {config} | failed: {r['error']} |" + " |" * 9
    loss = "n/a" if r.get("train_loss") is None else f"{r['train_loss']:.3f}"
    return (f"| {config} | **{r['real_tok_cpu_s']:.0f}** | {r['trained_tok_cpu_s']:.0f} | {r['real_tok_s']:.0f} | "
            f"{r['cpu_s_per_step']:.2f} / {r['s_per_step']:.2f} | {100 * r['pad_share']:.0f} % | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_train_rss_mb']:.0f} | {r['setup_s']:.0f} | {r['load']:.1f} | {loss} |")


TABLE_HEAD = ["| configuration | real tok / CPU s | trained tok / CPU s | real tok / wall s | CPU / wall s per step | pad "
              "| peak RSS MB | train RSS MB | setup s | load | loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def ratio_lines(res: dict, key="real_tok_cpu_s") -> list:
    "The ratios the issue asks for, in real tokens per CPU second (and per wall second)."
    tps = {c: (r[key], r["real_tok_s"]) for c, r in res.items() if "error" not in r}
    out = []
    def ratio(name, num, den):
        if num in tps and den in tps:
            out.append(f"- {name}: **{tps[num][0] / tps[den][0]:.2f}x** (wall clock: {tps[num][1] / tps[den][1]:.2f}x)")
    ratio("qlora-nb / qlora.py", "qlora-nb", "qlora.py")
    ratio("qlora-nb / trl (fp32)", "qlora-nb", "trl")
    ratio("qlora-nb --bf16 / qlora.py --bf16", "qlora-nb --bf16", "qlora.py --bf16")
    ratio("qlora-nb --bf16 / trl --bf16", "qlora-nb --bf16", "trl --bf16")
    ratio("qlora-nb --bf16 / qlora-nb (fp32)", "qlora-nb --bf16", "qlora-nb")
    ratio("qlora-nb --compile_blocks / qlora.py", COMPILED, "qlora.py")
    ratio("qlora-nb --compile_blocks / trl (fp32)", COMPILED, "trl")
    ratio("qlora-nb --compile_blocks --bf16 / qlora.py --bf16", COMPILED + BF16, "qlora.py --bf16")
    ratio("qlora-nb --compile_blocks --bf16 / trl --bf16", COMPILED + BF16, "trl --bf16")
    ratio("qlora-nb --compile_blocks / qlora-nb (fp32, eager blocks)", COMPILED, "qlora-nb")
    ratio("qlora-nb --compile_blocks --bf16 / qlora-nb --bf16 (eager blocks)", COMPILED + BF16, "qlora-nb --bf16")
    for c in (COMPILED, COMPILED + BF16):  # what the compilation costs, once per run: in the first, untimed step
        eager = c.replace(" --compile_blocks", "")
        if c in res and eager in res and "error" not in res[c] and "error" not in res[eager] and "untimed_cpu_s" in res[c]:
            out.append(f"- {c}: its untimed first step (the compilation) took {res[c]['untimed_cpu_s']:.1f} CPU s, "
                       f"{eager}'s {res[eager]['untimed_cpu_s']:.1f}")
    peak = {c: r["peak_rss_mb"] for c, r in res.items() if "error" not in r}
    for tool in ("qlora.py", "trl"):  # the best qlora-nb setting within the tool's best row's peak memory (the goal)
        theirs = [c for c in tps if c == tool or c.startswith(tool + " ")]
        if not theirs: continue
        bt = max(theirs, key=lambda c: tps[c][0])
        mine = [c for c in tps if c.startswith("qlora-nb") and "full logits" not in c and peak[c] <= peak[bt]]
        if mine:
            bo = max(mine, key=lambda c: tps[c][0])
            ratio(f"best qlora-nb within its peak memory ({bo}, {peak[bo]:.0f} MB) / best {tool} ({bt}, {peak[bt]:.0f} MB)",
                  bo, bt)
    ratio("qlora-nb --gradient_checkpointing False / qlora.py (more memory: see peak RSS)", NOCKPT, "qlora.py")
    ratio("qlora-nb --gradient_checkpointing False --bf16 / qlora.py --bf16 (more memory: see peak RSS)", NOCKPT + BF16, "qlora.py --bf16")
    ratio("qlora-nb every_n_layers 5 / qlora.py (more memory: see peak RSS)", EVERY5, "qlora.py")
    ratio("qlora-nb every_n_layers 5 --bf16 / qlora.py --bf16 (more memory: see peak RSS)", EVERY5 + BF16, "qlora.py --bf16")
    ratio(f"{COMPILED5} / qlora.py (see peak RSS)", COMPILED5, "qlora.py")
    ratio(f"{COMPILED5} --bf16 / qlora.py --bf16 (see peak RSS)", COMPILED5 + BF16, "qlora.py --bf16")
    ratio("qlora-nb --packing / qlora.py", "qlora-nb --packing", "qlora.py")
    ratio("qlora-nb --packing / trl packing", "qlora-nb --packing", "trl packing")
    ratio("label-only lm_head, unpacked: qlora-nb / qlora-nb (full logits)", "qlora-nb", FULL)
    ratio("label-only lm_head, packed: qlora-nb --packing / qlora-nb --packing (full logits)", "qlora-nb --packing", FULL_PACKED)
    return out


def cpu_features() -> str:
    "The features that decide bf16's speed here: AVX512-BF16 and AMX (/proc/cpuinfo), and torch's kernel set."
    import torch
    flags = set(next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split())
    amx = sorted(f for f in flags if f.startswith("amx"))
    forced, preload = os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("LD_PRELOAD")
    return (f"AVX512-BF16: {'yes' if 'avx512_bf16' in flags else 'no'}; AMX: {', '.join(amx) if amx else 'no'}; "
            f"torch kernels: {torch.backends.cpu.get_cpu_capability()}"
            + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")
            # the allocator changes peak memory and speed (RESULTS.md, "Where the memory goes"): say when it is not glibc's
            + f"; allocator: {f'LD_PRELOAD={Path(preload).name}' if preload else 'glibc malloc'}")


def machine(load_at_start) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({cpu}; {cpu_features()}), Linux "
            f"{platform.release()}; shared with other work: load average {load_at_start:.1f} at the start")


def versions() -> str:
    import importlib.metadata as md
    return ", ".join(f"{p} {md.version(p)}" for p in ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"]) \
        + f", python {platform.python_version()}"


def report(all_results: dict, opts, load_at_start, start=MARK_START, end=MARK_END) -> str:
    "The Markdown section for bench/RESULTS.md (also printed)."
    cmd = " ".join(["python bench/bench_train.py", *sys.argv[1:]])
    title = "on the real model (SmolLM2-135M-Instruct)" if start == REAL_START else "on the CPU"
    lines = [start, f"## Training throughput {title}: qlora.py vs TRL SFTTrainer vs qlora-nb", "",
             f"Generated by `{cmd}` on {datetime.date.today()} (the figures below are replaced on each run).", "",
             f"- Machine: {machine(load_at_start)}.",
             f"- Versions: {versions()}.",
             f"- Same for every configuration: {opts.records} synthetic Alpaca records (`make_alpaca_records`, log-normal "
             f"lengths), 4-bit NF4 + double quant, fp32 compute (bf16 compute, LoRA weights and autocast in the --bf16 rows), LoRA alpha 16 / dropout 0 on every linear layer but lm_head, "
             f"gradient accumulation 1, source_max_len {opts.source_max_len} / target_max_len {opts.target_max_len} "
             f"(packed rows and TRL's max_length: {opts.source_max_len + opts.target_max_len}), optimizer {opts.optim} "
             f"(bitsandbytes falls back to unpaged on the CPU), lr 2e-4 constant, activation checkpointing on (but in the --gradient_checkpointing False rows), no "
             f"checkpoint saving, {opts.threads} torch thread(s), one fresh process per configuration and round, "
             f"best of {opts.rounds} round(s) (configurations interleaved).",
             "- **real tok / CPU s** (the comparison metric): non-padding tokens (prompt + answer) per CPU second of the "
             "process over the timed steps; CPU time depends much less than wall time on what else the shared machine "
             "runs (single runs still differ by up to 30 %). trained tok: label-bearing tokens. CPU / wall s per step: means over the timed steps. peak RSS: whole "
             "process (ru_maxrss); train RSS: peak sampled during training only. setup: process start to the first step "
             "(imports, model load, data preparation). load: 1-minute load average when the configuration ended. "
             "loss: mean training loss over all steps.", ""]
    for model_name, res in all_results.items():
        m = MODELS[model_name]
        spec = next((r["spec"] for r in res.values() if "spec" in r), None)
        how = f"batch {spec['batch_size']}, {spec['steps']} steps, the first {spec['warmup']} untimed" if spec else ""
        lines += [f"### {model_name}: {m['desc']}; LoRA r {m['lora_r']}; {how}", "", *TABLE_HEAD]
        lines += [fmt_row(c, r) for c, r in res.items()] + [""] + ratio_lines(res) + [""]
    argv = qlora_nb_argv(dict(model="MODEL", data="DATA.json", output_dir="OUT", steps="N", batch_size="B",
                              source_max_len=opts.source_max_len, target_max_len=opts.target_max_len, lora_r="R",
                              lora_alpha=16, lora_dropout=0.0, optim=opts.optim))
    lines += [f"The qlora-nb rows ran `qlora-nb {' '.join(argv)} [--packing] [--bf16] [--gradient_checkpointing False] [--compile_blocks] [--activation_checkpointing_kwargs JSON]` (`qlora_nb.cli.main` in the worker "
              "process, so the observer can count its tokens); the (full logits) rows the same with "
              "`QLoRATrainer.label_only_loss = False` set first.", ""]
    return "\n".join(lines + [end])


def write_results(section: str, start: str = MARK_START, end: str = MARK_END):
    "Replace a benchmark's section of bench/RESULTS.md, between its `start` and `end` marks (other sections are kept)."
    old = RESULTS.read_text() if RESULTS.exists() else "# qlora_nb benchmark results\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + section + rest.split(end, 1)[1]
    else: new = old.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(new)


def parse_opts(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,larger,real", help="comma-separated: tiny, larger, real")
    p.add_argument("--configs", default=None, help=f"comma-separated, from: {', '.join(CONFIGS)}; default: every fp32 "
                   "configuration for tiny and larger, the fp32 and --bf16 rows of qlora.py, trl and qlora-nb for real")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every configuration (1: steady on shared cores)")
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, keep the best")
    p.add_argument("--batch_size", type=int, default=None, help="per-step batch (default: per model, see MODELS)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: per model)")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--source_max_len", type=int, default=256)
    p.add_argument("--target_max_len", type=int, default=256)
    p.add_argument("--optim", default="paged_adamw_32bit")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per configuration")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the tables again from the last run's figures (bench/_work/last_results.json)")
    opts = p.parse_args(argv)
    opts.models = opts.models.split(",")
    opts.configs = opts.configs.split(",") if opts.configs else None
    bad = [c for c in opts.configs or [] if c not in CONFIGS] + [m for m in opts.models if m not in MODELS]
    if bad: p.error(f"unknown {bad}; configurations: {CONFIGS}; models: {list(MODELS)}")
    return opts


def main(argv=None):
    opts = parse_opts(argv)
    load_at_start = os.getloadavg()[0]
    if opts.report_only:  # the tables again, from the last run's figures (its command line is kept with them)
        runs = json.loads((WORK/"last_results.json").read_text())
        sys.argv[1:] = runs.pop("_command", "python bench/bench_train.py").split()[2:]
        load_at_start = runs.pop("_load_at_start", load_at_start)
    else:
        runs = run_all(opts)
        (WORK/"last_results.json").write_text(json.dumps(runs | {"_command": " ".join(["python bench/bench_train.py",
            *sys.argv[1:]]), "_load_at_start": load_at_start}, indent=1, default=str))
    best = {m: {c: best_of(rs) for c, rs in by_config.items()} for m, by_config in runs.items()}
    write_sections(best, opts, load_at_start)


def run_all(opts) -> dict:
    "{model: {configuration: [figures of each round]}}, running every configuration in its own process."
    data, paths = prepare(opts)
    runs, t0 = {m: {c: [] for c in model_configs(m, opts)} for m in opts.models}, time.perf_counter()
    for model_name in opts.models:
        configs = model_configs(model_name, opts)
        for round_no in range(opts.rounds):
            shift = round_no % len(configs)  # a different order each round
            for config in configs[shift:] + configs[:shift]:
                r = run_config(config, model_name, paths[model_name], data, opts, round_no)
                runs[model_name][config].append(r)
                print(f"[{time.perf_counter() - t0:5.0f}s] {model_name:6} {config:20} " +
                      (r["error"] if "error" in r else f"{r['real_tok_cpu_s']:7.0f} real tok/CPU s {r['real_tok_s']:7.0f} "
                       f"real tok/s {r['cpu_s_per_step']:6.2f} CPU s/step  peak RSS {r['peak_rss_mb']:.0f} MB  "
                       f"load {r['load']:.1f}"), flush=True)
    return runs


def write_sections(best, opts, load_at_start):
    "Print each table and write it to its section of bench/RESULTS.md (the real model's has its own)."
    for models, (start, end) in (([m for m in best if m != "real"], (MARK_START, MARK_END)),
                                 (["real"] if "real" in best else [], (REAL_START, REAL_END))):
        if not models: continue
        section = report({m: best[m] for m in models}, opts, load_at_start, start, end)
        print("\n" + section)
        if not opts.no_write: write_results(section, start, end); print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


def model_configs(model_name, opts) -> list:
    "The configurations to run on `model_name`: --configs, or the model's own list, or every fp32 one."
    return opts.configs or MODELS[model_name].get("configs", FP32_CONFIGS)


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]: worker_main(worker)
    else: main()
