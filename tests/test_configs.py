"""The run configs shipped in `qlora_nb/configs/` (as torchtune ships its recipes' configs): each opens with the
command that runs it and comments every knob, loads through the loader that command uses, and is in the wheel and the
sdist."""
import re, shutil, subprocess, sys, tarfile, tomllib, zipfile
from importlib.resources import files
from pathlib import Path

import pytest

from qlora_nb.config import parse_args, read_yaml

from helpers import ROOT
CONFIGS = sorted((ROOT/"qlora_nb"/"configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if p.read_text().startswith("# qlora-nb train --config ")]
LAUNCH_CONFIGS = [p for p in CONFIGS if p.read_text().startswith("# accelerate launch --config_file ")]
by_name = lambda p: p.name

# qlora.py's scripts/finetune_guanaco_7b.sh (artidoro/qlora), in transformers 5 names: the reference for the 7B config
GUANACO_7B = dict(model_name_or_path="huggyllama/llama-7b", bits=4, quant_type="nf4", double_quant=True, bf16=True,
                  lora_r=64, lora_alpha=16, lora_dropout=0.1, learning_rate=0.0002, optim="paged_adamw_32bit",
                  max_steps=1875, source_max_len=16, target_max_len=512, lr_scheduler_type="constant",
                  warmup_steps=0.03, max_grad_norm=0.3, adam_beta2=0.999, weight_decay=0.0, dataset="oasst1")


def test_each_config_is_one_of_the_two_kinds():
    assert {"llama7b_qlora.yaml", "fsdp_qlora.yaml"} <= {p.name for p in CONFIGS}, CONFIGS
    assert set(CONFIGS) == set(RUN_CONFIGS) | set(LAUNCH_CONFIGS), "each config opens with the command that runs it"


@pytest.mark.parametrize("path", CONFIGS, ids=by_name)
def test_the_opening_command_runs_this_file(path):
    command = path.read_text().splitlines()[0]
    assert f"qlora_nb/configs/{path.name}" in command, command
    for named in re.findall(r"qlora_nb/configs/\S+\.yaml", command): assert (ROOT/named).is_file(), named


@pytest.mark.parametrize("path", CONFIGS, ids=by_name)
def test_every_knob_has_a_comment(path):
    # a `key: value` line without a comment; a section header (`fsdp_config:`) holds commented knobs instead
    bare = [l for l in path.read_text().splitlines()
            if l.strip() and not l.lstrip().startswith("#") and "  # " not in l and not l.rstrip().endswith(":")]
    assert not bare, bare


def test_the_7b_config_holds_the_guanaco_7b_settings():
    values, notices = read_yaml(ROOT/"qlora_nb"/"configs"/"llama7b_qlora.yaml")
    assert notices == [], notices  # written in today's names: nothing to translate
    assert {k: values.get(k) for k in GUANACO_7B} == GUANACO_7B
    assert values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] == 16  # the paper's batch


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=by_name)
def test_parse_args_takes_it_as_the_command_line_does(path):
    # `--bf16` is refused by transformers' TrainingArguments on a machine without a bfloat16 GPU, so it is the one
    # setting overridden here (on the command line, as a user would); read_yaml above checks its value in the file
    values, _ = read_yaml(path)
    args = parse_args(["--config", str(path), "--bf16", "False"], quiet=True)
    got = {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in values}  # enums (optim, ...) as text
    assert {k: v for k, v in got.items() if k != "bf16"} == {k: v for k, v in values.items() if k != "bf16"}
    assert args.training_args.gradient_accumulation_steps == values["gradient_accumulation_steps"]  # reached Trainer


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=by_name)
def test_accelerate_reads_it_and_the_run_it_names_matches(path):
    from accelerate.commands.config.config_args import load_config_from_file  # what `accelerate launch` calls
    config = load_config_from_file(str(path))
    assert (config.distributed_type.value, config.num_machines) == ("FSDP", 1), config
    assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD", config.fsdp_config
    for named in re.findall(r"--config (qlora_nb/configs/\S+\.yaml)", path.read_text().splitlines()[0]):
        values, _ = read_yaml(ROOT/named)  # mixed_precision bf16 shards bfloat16-stored 4-bit weights: needs --bf16
        precision = str(getattr(config.mixed_precision, "value", config.mixed_precision))
        assert values.get("bf16") is (precision == "bf16"), (named, precision)


def test_package_data_names_every_config():
    patterns = tomllib.loads((ROOT/"pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qlora_nb"]
    matched = {p for pattern in patterns for p in (ROOT/"qlora_nb").glob(pattern)}
    assert set(CONFIGS) <= matched, (patterns, CONFIGS)
    listed = {r.name for r in (files("qlora_nb")/"configs").iterdir()}  # as an installed package finds them
    assert {p.name for p in CONFIGS} <= listed, listed


def test_the_wheel_and_the_sdist_carry_every_config(tmp_path):
    src = tmp_path/"src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"): shutil.copy(ROOT/name, src/name)
    shutil.copytree(ROOT/"qlora_nb", src/"qlora_nb", ignore=shutil.ignore_patterns("__pycache__"))
    build = ("from setuptools import build_meta as b\n"  # the build backend pyproject.toml names, as pip runs it
             "print('built', b.build_wheel('dist'), b.build_sdist('dist'))")
    r = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    built = next(l for l in r.stdout.splitlines() if l.startswith("built ")).split()[1:]  # the backend's own log too
    wheel, sdist = (src/"dist"/name for name in built)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for p in CONFIGS:
        name = f"qlora_nb/configs/{p.name}"
        assert name in in_wheel and name in in_sdist, (name, sorted(in_wheel)[:40])
