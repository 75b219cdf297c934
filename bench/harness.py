"""What the benchmarks share: the environment they run in, the token counter, the step observer, the runners of
`qlora-nb train` and TRL, and the worker processes that run one configuration each.

Imported first by bench/bench_train.py, bench/gpu_check.py and the smaller scripts (run as `python bench/X.py`, Python
puts bench/ on sys.path): it makes every run offline and puts this checkout first on sys.path, so qlora_nb imports
from it without installing. A script runs each configuration with `run_worker` in a fresh process (its peak memory is
its own), which calls the script's own worker function through `worker_main`; that function installs an `Observer`
before any Trainer is built, trains, and returns the observer's figures.
"""
import json, os, re, resource, subprocess, sys, threading, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
WORKER = "--worker"  # a worker process's command line: `python bench/X.py --worker SPEC.json RESULT.json`


# ---------------------------------------------------------------------------------------------------------------------
# Inside a worker process: the token counter and the observer (step clock, token counter, memory sampler, profiler)

def count_tokens(inputs) -> tuple:
    """(real, trained) tokens of one batch, by one definition for every pipeline: real = not padding (the attention
    mask's ones; for packed rows without a mask, everything up to a row's last label, since its padding follows its
    last example), trained = label-bearing (labels != IGNORE_INDEX)."""
    import torch
    from qlora_nb.data import IGNORE_INDEX
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2: real = int(mask.sum())
    else:
        at = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        real = int((torch.where(labels != IGNORE_INDEX, at, -1).max(dim=1).values + 1).sum())
    return real, int((labels != IGNORE_INDEX).sum())


def rss_bytes() -> int:
    "Resident memory of this process now."
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_in_use() -> bool:
    "Whether this process computes on a GPU (a CPU run on a GPU machine leaves CUDA uninitialized)."
    import torch
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync():
    "Wait for the GPU's queued kernels, so that a clock read after it includes them (nothing on the CPU)."
    import torch
    if gpu_in_use(): torch.cuda.synchronize()


class Observer:
    """Watches every Trainer built after `install`, changing nothing: each optimizer step's end (wall and CPU clock,
    after a GPU sync), its tokens (`count_tokens` of each micro-batch), the logged losses, the peak resident memory
    while training; optionally the 4-bit weights' bits per parameter and a torch.profiler summary of one step."""
    def __init__(self):
        self.steps, self.tokens, self.losses, self.loss, self.train_loss = [], {}, {}, None, None
        self.bits = self.profile = None
        self.peak_train_rss, self.t_start, self._sampling = 0, time.perf_counter(), False

    def install(self, weight_bits: bool = False, profile_step: int | None = None):
        """`weight_bits`: measure the 4-bit weights' bits per parameter when training begins; `profile_step`: the
        optimizer step (1-based) to run under torch.profiler (one step after the timed ones)."""
        import transformers
        self.count_training_steps()
        transformers.trainer.DEFAULT_CALLBACKS.append(self.step_clock(weight_bits))  # every Trainer built from now on
        if profile_step: transformers.trainer.DEFAULT_CALLBACKS.append(self.step_profile(profile_step))

    def count_training_steps(self):
        "Wrap Trainer.training_step: each micro-batch's (real, trained, slots) tokens, added to its optimizer step's."
        from transformers import Trainer
        obs, training_step = self, Trainer.training_step
        def counting_training_step(trainer, model, inputs, *args, **kwargs):
            step = trainer.state.global_step + 1  # the optimizer step this micro-batch belongs to
            (real, trained), old = count_tokens(inputs), obs.tokens.get(step, (0, 0, 0))
            obs.tokens[step] = (old[0] + real, old[1] + trained, old[2] + inputs["input_ids"].numel())
            return training_step(trainer, model, inputs, *args, **kwargs)
        Trainer.training_step = counting_training_step

    def step_clock(self, weight_bits: bool):
        "A TrainerCallback: the clocks at the start and after each optimizer step, the losses, the memory sampler."
        from transformers import TrainerCallback
        obs = self
        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                if weight_bits and model is not None: obs.bits = measured_weight_bits(model)
                obs.tick(state.global_step); obs.start_sampling()
            def on_step_end(self, args, state, control, **kw): obs.tick(state.global_step)
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs: obs.loss = obs.losses[state.global_step] = float(logs["loss"])
                if logs and "train_loss" in logs: obs.train_loss = float(logs["train_loss"])
            def on_train_end(self, args, state, control, **kw): obs._sampling = False
        return StepClock()

    def tick(self, step: int):
        "Read the clocks (wall, CPU) at the end of optimizer step `step`, its GPU work included."
        sync(); self.steps.append((step, time.perf_counter(), time.process_time()))

    def start_sampling(self):
        self._sampling = True
        def sample():
            while self._sampling:
                self.peak_train_rss = max(self.peak_train_rss, rss_bytes()); time.sleep(0.05)
        threading.Thread(target=sample, daemon=True).start()

    def step_profile(self, profile_step: int):
        "A TrainerCallback: optimizer step `profile_step` under torch.profiler, summarized into `profile`."
        from transformers import TrainerCallback
        obs = self
        class StepProfile(TrainerCallback):  # after StepClock: its sync ends the step before the profiler stops
            prof = t0 = None
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == profile_step:
                    from torch.profiler import ProfilerActivity, profile
                    sync()
                    acts = [ProfilerActivity.CUDA] if gpu_in_use() else [ProfilerActivity.CPU]  # kernels only
                    self.prof = profile(activities=acts); self.prof.__enter__(); self.t0 = time.perf_counter()
            def on_step_end(self, args, state, control, **kw):
                if self.prof is not None and state.global_step == profile_step:
                    sync(); wall = time.perf_counter() - self.t0
                    self.prof.__exit__(None, None, None)
                    try: obs.profile = summarize_profile(self.prof, wall)
                    except Exception as e: obs.profile = dict(error=f"{type(e).__name__}: {e}"[:300])
                    self.prof = None
        return StepProfile()

    def result(self, warmup: int, upto: int | None = None) -> dict:
        """Figures over steps `warmup` + 1 to `upto` (default: the last; a profiled step after `upto` is not timed).
        loss: the loss logged at step `upto`; train_loss: the Trainer's mean over every step."""
        import torch
        step0, wall0, cpu0 = next((s for s in self.steps if s[0] == warmup), self.steps[0])
        last, wall1, cpu1 = next((s for s in self.steps if s[0] == upto), self.steps[-1])
        timed = range(step0 + 1, last + 1)
        real, trained, slots = (sum(self.tokens.get(s, (0, 0, 0))[i] for s in timed) for i in range(3))
        wall, cpu, n, gpu = wall1 - wall0, cpu1 - cpu0, max(1, len(timed)), gpu_in_use()
        return dict(steps=last, timed_steps=len(timed), wall_s=wall, cpu_s=cpu, s_per_step=wall / n,
                    cpu_s_per_step=cpu / n, real_tokens=real, trained_tokens=trained, slots=slots,
                    real_tok_s=real / wall, real_tok_cpu_s=real / cpu, trained_tok_cpu_s=trained / cpu,
                    pad_share=1 - real / slots, load=os.getloadavg()[0], setup_s=self.steps[0][1] - self.t_start,
                    untimed_cpu_s=cpu0 - self.steps[0][2],  # the steps before the timed ones: warm-up, compilation
                    train_loss=self.train_loss, loss=self.losses.get(last, self.loss), weight_bits=self.bits,
                    profile=self.profile, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    peak_train_rss_mb=self.peak_train_rss / 2**20,
                    peak_bytes=torch.cuda.max_memory_allocated() if gpu else None,
                    reserved_bytes=torch.cuda.max_memory_reserved() if gpu else None)


def measured_weight_bits(model) -> float | None:
    "Bits per parameter of the 4-bit linear weights, measured on the loaded model."
    from qlora_nb.lora import dtype_table
    rows = [r for r in dtype_table(model) if r["dtype"] in ("nf4", "fp4")]
    return 8 * sum(r["bytes"] for r in rows) / sum(r["params"] for r in rows) if rows else None


KERNEL_GROUPS = [  # (group, substrings of a kernel's name, lower case), first match wins
    ("4-bit dequantize", ("dequantize", "kdequant")), ("optimizer", ("optimizer", "adam")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "wgmma", "matmul")),
    ("copies", ("memcpy", "memset")), ("elementwise/reductions", ("at::native", "elementwise", "reduce")),
    ("Triton (Liger etc.)", ("triton",))]


def kernel_group(name: str) -> str:
    low = name.lower()
    g = next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), None)
    return g or ("Triton (Liger etc.)" if name.startswith("_") and name.endswith("kernel") else "other")


def summarize_profile(prof, wall: float) -> dict:
    "One profiled step: GPU kernel time by group and the top kernels (CPU ops' self time where there is no GPU)."
    from torch.autograd import DeviceType
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if events: times = [(e.name, e.time_range.elapsed_us()) for e in events]
    else: times = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    by_name, groups = {}, {}
    for name, us in times: by_name[name] = by_name.get(name, 0.0) + us
    for name, us in by_name.items(): groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + us
    total = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda x: -x[1])[:8]
    return dict(device="cuda" if events else "cpu", wall_s=wall, kernel_s=total / 1e6, kernels=len(times),
                groups={g: us / 1e6 for g, us in sorted(groups.items(), key=lambda x: -x[1])},
                top=[(n[:90], us / 1e6) for n, us in top])


# ---------------------------------------------------------------------------------------------------------------------
# Inside a worker process: the runners

def run_qlora_nb(argv: list):
    "`qlora-nb <argv>` exactly as a user types it, in this process (so the observer sees its Trainer)."
    from qlora_nb.cli import main
    rc = main([str(a) for a in argv])
    if rc: raise SystemExit(f"qlora-nb {argv[0]} exited with status {rc}")


def nf4_config(compute_dtype):
    """4-bit NF4 with double quantization, computing in `compute_dtype`: qlora-nb's --bits 4 and qlora.py's (which also
    passes llm_int8_threshold=6.0 and llm_int8_has_fp16_weight=False, the defaults)."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def train_trl(model: str, args, dataset, lora_r: int, lora_alpha: int, lora_dropout: float, fp32: bool):
    "TRL's SFTTrainer on `dataset` with `args` (an SFTConfig), LoRA on every linear layer but lm_head; trains."
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear")  # every linear layer but lm_head
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="right")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    if fp32:  # TRL casts a 4-bit model's adapters to bf16; an fp32 run keeps them fp32, as the other pipelines do
        for p in trainer.model.parameters():
            if p.requires_grad: p.data = p.data.float()
    trainer.train()


# ---------------------------------------------------------------------------------------------------------------------
# The worker processes: started by run_worker, run by worker_main

def child_env(threads: int | None = None) -> dict:
    "The environment of a child process: this checkout on PYTHONPATH, and `threads` OpenMP/MKL threads if given."
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = os.environ | {"PYTHONPATH": path}
    return env if threads is None else env | dict(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_worker(script, spec: dict, stem: Path, timeout: float, threads: int | None = None,
               launcher: list | None = None) -> dict:
    """Run one configuration in a fresh process, `script --worker STEM.spec.json STEM.result.json` (through `launcher`,
    e.g. `accelerate launch`, if given; output in STEM.log), within `timeout` seconds: its figures, or its error."""
    spec_path, result, log = (Path(f"{stem}.{ext}") for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec)); result.unlink(missing_ok=True)
    cmd = [*(launcher or [sys.executable]), str(script), WORKER, str(spec_path), str(result)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try: rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(threads),
                                 timeout=timeout).returncode
        except subprocess.TimeoutExpired: rc = "timeout"
    done = dict(process_s=time.perf_counter() - t0, log=str(log))
    if rc != 0 or not result.exists(): return dict(error=worker_error(rc, log)) | done
    return json.loads(result.read_text()) | done


def worker_error(rc, log: Path) -> str:
    "Why a worker failed, in one line: out of GPU memory or its exit status, the error it printed last, its log."
    text = log.read_text(errors="replace")
    why = "out of GPU memory" if "CUDA out of memory" in text or "OutOfMemoryError" in text else f"exit {rc}"
    lines = [l for l in text.splitlines() if l.strip()]
    said = [l for l in lines if l.startswith("qlora-nb: error:")] or \
           [l for l in lines if re.match(r"^\w+(Error|Exception)\b", l)] or lines[-1:]
    where = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
    return f"{why}; {said[-1][:300] if said else ''} (log: {where})"


def worker_main(work):
    """The worker process's side (argv: --worker SPEC RESULT): `work(spec)` runs the configuration and returns its
    figures, written to RESULT as JSON by rank 0 (one writer under `accelerate launch`)."""
    spec_path, result_path = sys.argv[2:4]
    figures = work(json.loads(Path(spec_path).read_text()))
    if int(os.environ.get("RANK", 0)) == 0: Path(result_path).write_text(json.dumps(figures))
