"""peft's LoRA variants through `python -m qlora_nb train`: each trains a few steps on the 4-bit tiny model, records
its settings in metrics.json and adapter_config.json, and saves an adapter that `PeftModel.from_pretrained` puts back
on the base model with the logits the trained model had in the training process (written there by a patch, before
anything was saved). DoRA and rsLoRA also resume exactly: checkpoint-2 + resume == 4 steps straight. PiSSA, OLoRA and
QPiSSA train on a residual base and save an adapter converted for the original base (rank 2r): it computes the trained
model on that base, resumes exactly and merges. DoRA trains under torchrun. What cannot work stops with a message before
anything loads, and a resumed run keeps its checkpoint's variant."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from helpers import ENV, ROOT, run_qlora_nb, tiny_flags
from qlora_nb.config import parse_args
from qlora_nb.lora import count_parameters
from qlora_nb.quant import load_base_model
from qlora_nb.model import INITIAL_ADAPTER, LORA_INIT, RESIDUAL_MODEL, load_base_and_tokenizer
from transformers import AutoModelForCausalLM
from peft import LoraConfig
from qlora_nb.merge import logit_tolerance

IDS = [[1, 20, 30, 40, 50, 60, 70, 80]]
# Runs in the training process: the trained model's logits on IDS, in memory, before the adapter is saved
SAVE_LOGITS = f"""
import os, torch, qlora_nb.train as T
_train = T.QLoRATrainer.train
def train(self, *a, **k):
    out = _train(self, *a, **k)
    self.model.eval()
    with torch.no_grad(): torch.save(self.model(input_ids=torch.tensor({IDS})).logits, os.environ["LOGITS_FILE"])
    self.model.train()
    return out
T.QLoRATrainer.train = train
"""

VARIANTS = {  # name: (flags, what adapter_config.json must say)
    "dora": (["--use_dora"], dict(use_dora=True)),
    "rslora": (["--use_rslora"], dict(use_rslora=True)),
    "gaussian": (["--init_lora_weights", "gaussian"], dict(init_lora_weights="gaussian")),
    "some_layers": (["--lora_target_modules", "q_proj,v_proj", "--lora_layers", "1"],
                    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "lm_head": (["--modules_to_save", "lm_head"], dict(modules_to_save=["lm_head"])),
}


@pytest.fixture(scope="module")
def data(alpaca_file): return alpaca_file(24)


def rounding(logits) -> float:
    "How far two float32 forwards of one model may be apart at these logits (`qlora_nb.merge.logit_tolerance`)."
    return logit_tolerance(torch.float32, logits.abs().max().item())


def train(data, out, *flags, logits=None):
    rc, _, err = run_qlora_nb("train", *tiny_flags(data, out, *flags), prelude=SAVE_LOGITS if logits else "",
                              env={"LOGITS_FILE": str(logits)} if logits else None)
    assert rc == 0, err[-3000:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_saves_and_loads(variant, data, tmp_path):
    flags, expected = VARIANTS[variant]
    out = tmp_path/"run"
    train(data, out, *flags, logits=tmp_path/"logits.pt")
    peft_config = json.loads((out/"adapter_model"/"adapter_config.json").read_text())
    for k, v in expected.items():
        assert (sorted(peft_config[k]) if isinstance(v, list) else peft_config[k]) == v, (k, peft_config[k])
    recorded = json.loads((out/"metrics.json").read_text())["config"]["training"]
    test_args = parse_args(tiny_flags(data, out, *flags), quiet=True)
    for k in ("use_dora", "use_rslora", "init_lora_weights", "lora_target_modules", "lora_layers", "modules_to_save"):
        assert recorded[k] == getattr(test_args, k), k
    base, _ = load_base_and_tokenizer(test_args)
    model = PeftModel.from_pretrained(base, out/"adapter_model").eval()
    with torch.no_grad(): logits = model(input_ids=torch.tensor(IDS)).logits
    trained = torch.load(tmp_path/"logits.pt")
    assert (logits - trained).abs().max().item() <= rounding(trained)  # another process, maybe other threads
    earlier = PeftModel.from_pretrained(load_base_and_tokenizer(test_args)[0], out/"checkpoint-2"/"adapter_model").eval()
    with torch.no_grad(): logits2 = earlier(input_ids=torch.tensor(IDS)).logits
    assert (logits2 - trained).abs().max().item() > rounding(trained)  # the step-2 adapter is not the trained one
    assert count_parameters(model) == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_variant_resumes_exactly(variant, data, tmp_path):
    flags = VARIANTS[variant][0]
    straight, resumed = tmp_path/"straight", tmp_path/"resumed"
    train(data, straight, *flags)
    shutil.copytree(straight/"checkpoint-2", resumed/"checkpoint-2")  # as if killed right after its first checkpoint
    if variant == "dora":  # the checkpoint's variant is kept: resuming without the flag is refused (RESUME_FIXED)
        rc, _, err = run_qlora_nb("train", *tiny_flags(data, resumed))
        assert rc == 2 and "was trained with --use_dora True; this command says --use_dora False" in err, err[-3000:]
    rc, _, err = run_qlora_nb("train", *tiny_flags(data, resumed, *flags))
    assert rc == 0 and "resuming from" in err, err[-3000:]
    a, b = (load_file(p/"adapter_model"/"adapter_model.safetensors") for p in (straight, resumed))
    assert sorted(a) == sorted(b) and (not variant == "dora" or any("magnitude" in k for k in a))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    other = load_file(straight/"checkpoint-2"/"adapter_model"/"adapter_model.safetensors")
    assert max((a[k] - other[k]).abs().max().item() for k in a) > 1e-4  # 2 steps are not 4: the comparison can fail


@pytest.mark.parametrize("flags, message", [
    (["--init_lora_weights", "olora", "--use_dora"], "which no LoRA adapter on W reproduces"),
    (["--init_lora_weights", "pissa", "--do_train", "false"], "peft computes PiSSA from full-precision weights"),
    (["--lora_layers", "0,5"], "has 2 blocks, numbered 0 to 1"),
    (["--lora_target_modules", "q_proj,qkv"], "--lora_target_modules qkv: LlamaForCausalLM has no linear layer"),
])
def test_refused_before_training(flags, message, data, tmp_path):
    rc, _, err = run_qlora_nb("train", *tiny_flags(data, tmp_path/"run", *flags))
    assert rc == 2 and message in err, err[-3000:]
    assert not list((tmp_path/"run").glob("checkpoint-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="LoftQ runs on a GPU")
def test_loftq_needs_a_gpu(data, tmp_path):
    rc, _, err = run_qlora_nb("train", *tiny_flags(data, tmp_path/"run", "--init_lora_weights", "loftq"))
    assert rc == 2 and "--init_lora_weights loftq needs a CUDA GPU" in err, err[-3000:]
    assert not (tmp_path/"run").exists()


# PiSSA, OLoRA and QPiSSA: a residual base. name: (flags, where the trained model's logits must be reproduced)
RESIDUAL = {"pissa": ["--init_lora_weights", "pissa", "--bits", "32"],
            "olora": ["--init_lora_weights", "olora", "--bits", "16"],
            "qpissa": ["--init_lora_weights", "pissa_niter_2", "--bits", "4"]}  # randomized: resume must not redo it


def logits_of(model):
    with torch.no_grad(): return model.eval()(input_ids=torch.tensor(IDS)).logits


def full_base(data, out, model=None):
    "The unquantized base (the original, or the folder `model`: a stored residual)."
    args = parse_args(tiny_flags(data, out, "--bits", "32"), quiet=True)
    if model: args.model_name_or_path = str(model)
    return load_base_model(args)


@pytest.fixture(scope="module")
def residual_runs(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("residual")
    for name, flags in RESIDUAL.items(): train(data, tmp/name, *flags, logits=tmp/f"{name}.pt")
    return tmp


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_variant_saves_an_adapter_for_the_original_base(name, residual_runs, data):
    out, trained = residual_runs/name, torch.load(residual_runs/f"{name}.pt")
    config = json.loads((out/"adapter_model"/"adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # rank 2r, same scale
    record = json.loads((out/"metrics.json").read_text())
    assert record["config"]["training"]["init_lora_weights"] == RESIDUAL[name][1]
    assert record["lora_init"]["saved_rank"] == 8 and (record["lora_init"]["residual_bytes"] > 0) == (name == "qpissa")
    converted = logits_of(PeftModel.from_pretrained(full_base(data, out), out/"adapter_model"))
    if name != "qpissa":
        assert (converted - trained).abs().max().item() <= rounding(trained)
        return
    # QPiSSA trained on the 4-bit residual. On the unquantized original the converted adapter computes exactly the raw
    # adapter on the unquantized residual; the trained model is the raw adapter on the residual rounded to NF4, so the
    # two differ by that rounding alone (a float32 forward of each, summed differently, on either side)
    raw = LoraConfig.from_pretrained(out/"checkpoint-4"/"adapter_model"); raw.init_lora_weights = True
    residual = full_base(data, out, out/RESIDUAL_MODEL)
    on_residual = PeftModel.from_pretrained(residual, out/"checkpoint-4"/"adapter_model", config=raw)
    assert (converted - logits_of(on_residual)).abs().max().item() <= rounding(trained)
    stored = parse_args(tiny_flags(data, out), quiet=True); stored.model_name_or_path = str(out/RESIDUAL_MODEL)
    on_nf4_residual = PeftModel.from_pretrained(load_base_model(stored), out/"checkpoint-4"/"adapter_model", config=raw)
    assert (logits_of(on_nf4_residual) - trained).abs().max().item() <= rounding(trained)  # what training computed
    assert (converted - trained).abs().max().item() > rounding(trained)  # the residual's NF4 rounding shows


@pytest.mark.parametrize("name", ["olora", "qpissa"])
def test_residual_variant_resumes_exactly(name, residual_runs, data, tmp_path):
    straight, resumed = residual_runs/name, tmp_path/"resumed"
    for kept in ("checkpoint-2", INITIAL_ADAPTER, LORA_INIT) + ((RESIDUAL_MODEL,) if name == "qpissa" else ()):
        (shutil.copytree if (straight/kept).is_dir() else shutil.copy)(straight/kept, resumed/kept)
    rc, _, err = run_qlora_nb("train", *tiny_flags(data, resumed, *RESIDUAL[name]))
    assert rc == 0 and "resuming from" in err and "saved converted for the original base" in err, err[-3000:]
    a, b = (load_file(p/"adapter_model"/"adapter_model.safetensors") for p in (straight, resumed))
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    c2, c4 = (load_file(straight/f"checkpoint-{n}"/"adapter_model"/"adapter_model.safetensors") for n in (2, 4))
    assert max((c2[k] - c4[k]).abs().max().item() for k in c2) > 1e-4  # 2 steps are not 4: the comparison can fail


@pytest.mark.parametrize("name, into", [("pissa", "dequantized"), ("qpissa", "original")])
def test_residual_variant_merges(name, into, residual_runs, data, tmp_path):
    out = residual_runs/name
    if name == "qpissa":  # into the 4-bit rounding of W, which it never trained against: refused
        rc, _, err = run_qlora_nb("merge", "--adapter", out, "--output_dir", tmp_path/"q", "--no_report")
        assert rc == 2 and "Pass --into original" in err, err[-3000:]
    rc, _, err = run_qlora_nb("merge", "--adapter", out, "--output_dir", tmp_path/"m", "--into", into,
                              "--dtype", "fp32", "--no_report")
    assert rc == 0, err[-3000:]
    merged = logits_of(AutoModelForCausalLM.from_pretrained(tmp_path/"m"))
    on_base = logits_of(PeftModel.from_pretrained(full_base(data, out), out/"adapter_model"))
    assert (merged - on_base).abs().max().item() <= rounding(on_base)  # the merge's promise (qlora_nb.merge)


@pytest.mark.parametrize("command", ["mmlu", "chat"])
def test_a_residual_runs_checkpoint_is_refused_for_inference(command, residual_runs, tmp_path):
    "A checkpoint of a PiSSA run holds the raw adapter of its residual base: mmlu and chat refuse it, the final one works."
    from qlora_nb.tiny import tiny_model_path, write_mmlu_files
    mmlu = ["--mmlu_path", str(write_mmlu_files(tmp_path/"mmlu", n_per_subject=2)), "--output_dir", str(tmp_path/"o")]
    rc, _, err = run_qlora_nb(command, "--model_name_or_path", tiny_model_path(), "--bits", "32",
                              "--adapter", residual_runs/"pissa"/"checkpoint-2", *(mmlu if command == "mmlu" else []))
    assert rc == 2 and "raw --init_lora_weights pissa adapter" in err and "Traceback" not in err, err[-3000:]
    if command == "mmlu":
        rc, _, err = run_qlora_nb(command, "--model_name_or_path", tiny_model_path(), "--bits", "32",
                                  "--adapter", residual_runs/"pissa", *mmlu)
        assert rc == 0, err[-3000:]


def test_dora_trains_under_torchrun(data, tmp_path):
    "Two processes (gloo, --use_cpu) train DoRA to the adapter one process trains with the same global batch."
    script, one, two = tmp_path/"run.py", tmp_path/"one", tmp_path/"two"
    script.write_text("import sys, runpy; sys.argv = ['qlora_nb'] + sys.argv[1:]; "
                      "runpy.run_module('qlora_nb', run_name='__main__')\n")
    common = ["--use_dora", "--use_cpu", "--train_sampling_strategy", "sequential", "--optim", "adamw_torch"]
    train(data, one, *common)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521"]
    flags = tiny_flags(data, two, *common, per_device_train_batch_size=2)
    r = subprocess.run([*launcher, str(script), "train", *flags],
                       capture_output=True, text=True, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_file(p/"adapter_model"/"adapter_model.safetensors") for p in (one, two))
    assert sorted(a) == sorted(b) and any("magnitude" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
