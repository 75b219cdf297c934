"""Data-parallel training on CPUs (issue 7): `torchrun --nproc_per_node 2 -m qlora_nb train` with the gloo backend.

Two processes with 1 example each and 2 micro-batches per step (gradient accumulation: DDP's `no_sync` for the first)
make the same global batch as one process with 4, so the loss curve and the final adapter must agree with a
single-process run up to floating-point summation order. The loss is the label-only one (issue 16): computed inside
DDP's forward, it must also agree with the every-position logits of transformers' path under DDP. Only rank 0 writes (a
log of every file each process creates, renames or removes under output_dir says so), and a checkpoint is published
before any process goes on: the two-process run forces the worst interleaving (rank 0 is slow to rename the staged
checkpoint) and rank 1 records whether it finds `checkpoint-N` in place when its own save returns."""
import json, re, subprocess, sys, textwrap
from pathlib import Path
import pytest
from safetensors.torch import load_file
from helpers import ENV, ROOT
from qlora_nb.tiny import make_alpaca_records, tiny_model_path

STEPS = 6
TOL = 1e-4  # adapters after 6 AdamW steps; the two runs differ only in how gradients are summed

def flags(data, out, per_device, *more, accum=1):
    return ["train", "--model_name_or_path", str(tiny_model_path()), "--dataset", str(data), "--dataset_format", "alpaca",
            "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", str(accum), "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--train_sampling_strategy", "sequential", "--optim", "adamw_torch", "--lora_r", "8",
            "--activation_checkpointing", "False", "--save_steps", "3", "--logging_steps", "1", "--seed", "0",
            "--source_max_len", "64", "--target_max_len", "32", "--report_to", "none", *more]

# Runs first in every process. It logs (to WRITE_LOG.<rank>) each file or folder the process creates, writes, renames
# or removes under WATCH_DIR: Python's audit events see open/mkdir/rename/remove, and torch.save and safetensors write
# from C++ and Rust, so those two are wrapped (before peft and transformers import them).
WRITE_LOG = textwrap.dedent("""
    import os, sys, torch, safetensors.torch
    _watch, _rank = os.path.realpath(os.environ["WATCH_DIR"]), os.environ.get("RANK", "0")
    _log = open(f"{os.environ['WRITE_LOG']}.{_rank}", "a", buffering=1)
    def _note(what, path):
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            p = os.path.realpath(os.fsdecode(path))
            if p == _watch or p.startswith(_watch + os.sep): _log.write(f"{what} {os.path.relpath(p, _watch)}\\n")
    def _audit(event, args):
        if event == "open" and args:
            mode, flags = args[1], args[2]  # builtins.open gives a mode, os.open flags
            if (any(c in mode for c in "wax+") if isinstance(mode, str)
                else isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)): _note("write", args[0])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"): _note(event, args[0])
        elif event == "os.rename": _note("rename-from", args[0]); _note("rename-to", args[1])
    sys.addaudithook(_audit)
    def _wrap(save):
        def wrapped(obj, f, *a, **k): _note("write", f); return save(obj, f, *a, **k)
        return wrapped
    torch.save, safetensors.torch.save_file = _wrap(torch.save), _wrap(safetensors.torch.save_file)
""")

# The worst interleaving for a checkpoint: rank 0 takes 2 s to publish it, and each process records, when its
# `_save_checkpoint` returns, whether `checkpoint-N` is in place (it must be: the process goes on to train, or to
# read it, next). `publish_checkpoint` is patched in qlora_nb.files before qlora_nb.train takes it from there.
SLOW_PUBLISH = textwrap.dedent("""
    import os, time
    from pathlib import Path
    import qlora_nb.files
    _publish = qlora_nb.files.publish_checkpoint
    def publish_checkpoint(staged, final): time.sleep(2); return _publish(staged, final)
    qlora_nb.files.publish_checkpoint = publish_checkpoint
    import qlora_nb.train
    _save_checkpoint = qlora_nb.train.QLoRATrainer._save_checkpoint
    def save_checkpoint(self, model, trial):
        _save_checkpoint(self, model, trial)
        name, out = f"checkpoint-{self.state.global_step}", Path(self.args.output_dir)
        seen = (out/name).is_dir() and not (out/".incomplete"/name).exists()
        with open(f"{os.environ['WRITE_LOG']}.{os.environ.get('RANK', '0')}.saves", "a") as f:
            f.write(f"{name} {'published' if seen else 'not published'}\\n")
    qlora_nb.train.QLoRATrainer._save_checkpoint = save_checkpoint
""")

# Runs first in every process: the label-only loss notes, at each call, the class of the model it is given (the DDP
# wrapper under torchrun), in a file beside output_dir. `compute_loss` looks the function up in qlora_nb.train.
LABEL_ONLY_LOG = textwrap.dedent("""
    import os, qlora_nb.train
    _label_only = qlora_nb.train.label_only_lm_head_loss
    def label_only_lm_head_loss(model, *args, **kwargs):
        with open(f"{os.environ['WATCH_DIR']}.label_only.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{type(model).__name__}\\n")
        return _label_only(model, *args, **kwargs)
    qlora_nb.train.label_only_lm_head_loss = label_only_lm_head_loss
""")
FULL_LOGITS = LABEL_ONLY_LOG + "qlora_nb.train.QLoRATrainer.label_only_loss = False\n"

def run(tmp, args, prelude="", torchrun=False, expect=0):
    "Run `qlora-nb ARGS` (under torchrun with 2 processes) with `prelude` first in each process."
    script = tmp/f"run_{len(list(tmp.glob('run_*.py')))}.py"
    main = "import sys, runpy; sys.argv = ['qlora_nb'] + sys.argv[1:]; runpy.run_module('qlora_nb', run_name='__main__')"
    script.write_text(f"{prelude}\n{main}\n")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"] if torchrun else []
    r = subprocess.run([sys.executable, *launcher, str(script), *args], capture_output=True, text=True, cwd=ROOT,
                       env={**ENV, "OMP_NUM_THREADS": "1", "WATCH_DIR": str(args[args.index("--output_dir") + 1]),
                            "WRITE_LOG": str(tmp/"writes")}, timeout=900)
    assert (r.returncode == 0) == (expect == 0), r.stderr[-4000:]
    return r

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp/"alpaca.json"; data.write_text(json.dumps(make_alpaca_records(64, seed=3)))
    run(tmp, flags(data, tmp/"one", 4, "--use_cpu"), LABEL_ONLY_LOG)
    two = flags(data, tmp/"two", 1, "--use_cpu", accum=2)  # DDP's no_sync for the first micro-batch of each step
    run(tmp, two, WRITE_LOG + SLOW_PUBLISH + LABEL_ONLY_LOG, torchrun=True)
    return tmp/"one", tmp/"two"

@pytest.fixture(scope="module")
def full_logits(runs):
    "The two-process run again, with transformers' every-position logits."
    two = runs[1]; full = two.parent/"two-full"
    run(two.parent, flags(two.parent/"alpaca.json", full, 1, "--use_cpu", accum=2), FULL_LOGITS, torchrun=True)
    return full

def losses(out):
    return [h["loss"] for h in json.loads((out/"trainer_state.json").read_text())["log_history"] if "loss" in h]

def label_only_calls(out, rank=0) -> list:
    path = out.parent/f"{out.name}.label_only.{rank}"
    return path.read_text().splitlines() if path.exists() else []

def logged(two, rank, suffix=""): return (two.parent/f"writes.{rank}{suffix}").read_text().splitlines()

def test_two_processes_follow_the_single_process_loss_curve(runs):
    one, two = runs
    assert len(losses(one)) == len(losses(two)) == STEPS
    assert losses(one) == pytest.approx(losses(two), rel=1e-3)

def test_two_processes_end_with_the_same_adapter(runs):
    a, b = (load_file(out/"adapter_model"/"adapter_model.safetensors") for out in runs)
    assert a.keys() == b.keys() and len(a) == 28
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOL, worst
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained

def test_the_label_only_loss_goes_through_ddp(runs, full_logits):
    one, two = runs
    assert label_only_calls(one) == ["PeftModelForCausalLM"] * STEPS  # one process: the peft model itself
    for rank in (0, 1): assert label_only_calls(two, rank) == ["DistributedDataParallel"] * 2 * STEPS, rank
    assert label_only_calls(full_logits) == label_only_calls(full_logits, 1) == []  # switched off: transformers' path

def test_under_ddp_the_label_only_loss_equals_transformers(runs, full_logits):
    two = runs[1]
    assert len(losses(two)) == STEPS and losses(two) == pytest.approx(losses(full_logits), rel=1e-5)
    a, b = (load_file(out/"adapter_model"/"adapter_model.safetensors") for out in (two, full_logits))
    assert a.keys() == b.keys() and len(a) == 28
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOL, worst

def test_only_rank_zero_writes(runs):
    _, two = runs
    record = json.loads((two/"metrics.json").read_text())
    assert record["metrics"]["train_runtime"] > 0 and (two/"completed").exists()
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in (two/"checkpoint-6").glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not any(p.name.startswith(".") for p in two.iterdir()), list(two.iterdir())  # no staging or temp files left
    # rank 1 writes its random state into the staged checkpoint (and may make that folder), nothing else
    own = re.compile(r"^(os\.mkdir|write) \.incomplete(/checkpoint-[36](/rng_state_1\.pth)?)?$")
    rank1 = logged(two, 1)
    assert [l for l in rank1 if not own.match(l)] == [], rank1
    assert {f"write .incomplete/checkpoint-{n}/rng_state_1.pth" for n in (3, 6)} <= set(rank1)  # it sees rank 1 write
    rank0 = set(logged(two, 0))  # and rank 0's: the run's own files
    assert {"rename-to metrics.json", "write completed", "write adapter_model/adapter_model.safetensors",
            "rename-to checkpoint-3", "rename-to checkpoint-6"} <= rank0, sorted(rank0)

def test_every_process_finds_the_checkpoint_published_when_its_save_returns(runs):
    _, two = runs
    for rank in (0, 1): assert logged(two, rank, ".saves") == ["checkpoint-3 published", "checkpoint-6 published"], rank

def test_processes_that_would_each_train_alone_are_refused(tmp_path, alpaca_file):
    "Without a GPU and without --use_cpu, transformers does not join torchrun's processes: each would train alone."
    out = tmp_path/"alone"
    r = run(tmp_path, flags(alpaca_file(16), out, 2), torchrun=True, expect=2)
    assert "2 processes were started (WORLD_SIZE=2), but each would train alone" in r.stderr
    assert "qlora-nb: error:" in r.stderr and "Pass --use_cpu" in r.stderr
    assert not out.exists()
