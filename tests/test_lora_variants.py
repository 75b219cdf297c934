"""peft's LoRA variants through `python -m qlora_nb train`: each trains a few steps on the 4-bit tiny model, records
its settings in metrics.json and adapter_config.json, and saves an adapter that `PeftModel.from_pretrained` puts back
on the base model with the logits the trained model had in the training process (written there by a patch, before
anything was saved). DoRA and rsLoRA also resume exactly: checkpoint-2 + resume == 4 steps straight. OLoRA, PiSSA and
LoftQ stop with a message before anything loads, and a resumed run keeps its checkpoint's variant."""
import json, shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import run_qlora_nb, tiny_flags
from qlora_nb.config import parse_args
from qlora_nb.lora import count_parameters
from qlora_nb.model import load_base_and_tokenizer

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
    assert (logits - trained).abs().max().item() <= 1e-5
    earlier = PeftModel.from_pretrained(load_base_and_tokenizer(test_args)[0], out/"checkpoint-2"/"adapter_model").eval()
    with torch.no_grad(): logits2 = earlier(input_ids=torch.tensor(IDS)).logits
    assert (logits2 - trained).abs().max().item() > 1e-4  # the step-2 adapter is not the trained one: the check can fail
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
    (["--init_lora_weights", "olora"], "qlora-nb does not yet convert it back when saving"),
    (["--init_lora_weights", "pissa"], "peft computes PiSSA from full-precision weights"),
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
