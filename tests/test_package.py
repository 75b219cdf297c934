"The package as a user meets it: importable without a GPU or network, and a command line that explains itself."
import json, os, subprocess, sys
from pathlib import Path
import pytest

from helpers import ROOT, run_python
MODULES = sorted(p.stem for p in (ROOT/"qlora_nb").glob("*.py") if not p.stem.startswith("_"))

def run(*args, **env):
    "`python ARGS` as a user without a GPU or network runs it (the user's environment, not the tests' ENV)."
    return run_python(*args, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **env})

def test_every_module_imports_without_gpu_or_network():
    assert {"config", "tiny", "cli"} <= set(MODULES)
    r = run("-c", "import importlib; [importlib.import_module(f'qlora_nb.{m}') for m in %r]" % MODULES)
    assert r.returncode == 0, r.stderr[-2000:]

def test_cli_help_lists_the_commands():
    r = run("-m", "qlora_nb", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "demo", "mmlu")), r.stdout

def test_cli_names_an_unknown_command_without_a_traceback():
    r = run("-m", "qlora_nb", "trian")
    assert r.returncode == 2
    assert "did you mean 'train'" in r.stderr and "Traceback" not in r.stderr, r.stderr

def test_bare_command_prints_the_usage_as_an_error():
    r = run("-m", "qlora_nb")
    assert (r.returncode, r.stdout) == (2, "") and "usage: qlora-nb COMMAND" in r.stderr, r.stderr

def test_train_help_lists_config():
    r = run("-m", "qlora_nb", "train", "--help")
    assert r.returncode == 0 and "--config RUN.yaml" in r.stdout and "--lora_r LORA_R" in r.stdout, r.stderr[-2000:]

FAST_PATH = """import contextlib, io, sys
from qlora_nb.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    codes = [main(argv) for argv in ([], ["--help"], ["train", "--help"], ["train", "--lora_rr", "3"], ["mmlu", "--help"])]
print(codes, sorted(m for m in ("torch", "transformers", "bitsandbytes", "peft", "datasets") if m in sys.modules))"""

def test_answers_that_need_no_model_import_no_torch():
    "The usage, `train --help` and a misspelled flag come from the standard library alone (timed: bench/bench_startup.py)."
    run("-m", "qlora_nb", "train", "--help")  # builds the flag table if this checkout has none cached yet
    r = run("-c", FAST_PATH)
    assert r.stdout.strip() == "[2, 0, 0, 2, 0] []", r.stdout + r.stderr[-2000:]

EVERY_HELP = """import contextlib, io, json
from qlora_nb.cli import COMMANDS, main
seen = {}
for name in COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        code = main([name, "--output_dir", "x", "--help"])  # help asked for after another flag, not first
    seen[name] = [code, out.getvalue().splitlines()[0] if out.getvalue() else ""]
print(json.dumps(seen))"""

def test_every_command_answers_help_anywhere_alike():
    "One way for all: `--help` anywhere among the flags prints the command's usage on stdout and exits 0."
    r = run("-c", EVERY_HELP)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    wrong = {name: v for name, v in seen.items() if v[0] != 0 or not v[1].startswith(f"usage: qlora-nb {name}")}
    assert not wrong, wrong
