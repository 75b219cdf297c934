"""Data-parallel training on CPUs (issue 7): `torchrun --nproc_per_node 2 -m qlora_nb train` with the gloo backend.

Two processes with 2 examples each make the same global batch as one process with 4, so the loss curve and the
final adapter must agree with a single-process run up to floating-point summation order, and only rank 0 writes."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from qlora_nb.tiny import make_alpaca_records, tiny_model_path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
TOL = 1e-4  # adapters after 6 AdamW steps; the two runs differ only in how gradients are summed

def flags(data, out, per_device):
    return ["train", "--model_name_or_path", str(tiny_model_path()), "--dataset", str(data), "--dataset_format", "alpaca",
            "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--train_sampling_strategy", "sequential", "--optim", "adamw_torch", "--lora_r", "8",
            "--activation_checkpointing", "False", "--save_steps", "3", "--logging_steps", "1", "--seed", "0",
            "--source_max_len", "64", "--target_max_len", "32", "--use_cpu", "--report_to", "none"]

def run(cmd, **env):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp/"alpaca.json"; data.write_text(json.dumps(make_alpaca_records(64, seed=3)))
    run([sys.executable, "-m", "qlora_nb", *flags(data, tmp/"one", 4)])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "qlora_nb", *flags(data, tmp/"two", 2)])
    return tmp/"one", tmp/"two"

def losses(out): return [h["loss"] for h in json.loads((out/"trainer_state.json").read_text())["log_history"] if "loss" in h]

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

def test_only_rank_zero_writes(runs):
    _, two = runs
    record = json.loads((two/"metrics.json").read_text())
    assert record["metrics"]["train_runtime"] > 0 and (two/"completed").exists()
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in (two/"checkpoint-6").glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not any(p.name.startswith(".") for p in two.iterdir()), list(two.iterdir())  # no staging or temp files left
