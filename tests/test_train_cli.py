"""`qlora-nb train` end to end as a user runs it: a real process on the tiny model and a local Alpaca file writes
the adapter, metrics.json and predictions.jsonl; a completed run is not trained again; --start_over retrains;
bad input gives a one-line message, exit 2, and writes nothing."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qlora_nb.tiny import tiny_model_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def flags(data, out, *more):
    return ["--model_name_or_path", str(tiny_model_path()), "--dataset", str(data), "--output_dir", str(out),
            "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
            "--source_max_len", "48", "--target_max_len", "24", "--eval_dataset_size", "6",
            "--max_new_tokens", "6", "--disable_tqdm", "true", "--seed", "3", *more]


def qlora_nb(*args, timeout=300):
    "Run `python -m qlora_nb ARGS`; returns (exit status, stdout, stderr)."
    p = subprocess.run([sys.executable, "-m", "qlora_nb", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def listing(folder):
    folder = Path(folder)
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def data(alpaca_file): return alpaca_file(60)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    "A completed `qlora-nb train` run with evaluation and prediction."
    out = tmp_path_factory.mktemp("finished")/"run"
    rc, _, err = qlora_nb("train", *flags(data, out, "--do_eval", "--do_predict"))
    assert rc == 0, err[-3000:]
    return out


def test_run_writes_adapter_metrics_and_predictions(finished):
    import peft, torch, transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    names = {p.name for p in finished.iterdir()}
    assert {"adapter_model", "metrics.json", "predictions.jsonl", "completed", "checkpoint-2", "checkpoint-4"} <= names
    assert not list(finished.rglob("pytorch_model.bin")) and not list(finished.rglob("model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path()), finished/"adapter_model")
    saved = load_file(finished/"adapter_model"/"adapter_model.safetensors")
    assert len(saved) == sum("lora_" in n for n, _ in model.named_parameters()) > 0
    record = json.loads((finished/"metrics.json").read_text())
    assert {"train_loss", "eval_loss", "predict_samples"} <= set(record["metrics"])
    assert record["config"]["training"]["max_steps"] == 4 and record["config"]["data"]["dataset"].endswith("alpaca.json")
    assert record["config"]["training"]["lora_r"] == 4 and record["seed"] == 3
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["peft"] == peft.__version__
    assert record["versions"]["transformers"] == transformers.__version__ and "bitsandbytes" in record["versions"]
    assert record["device"].startswith(("cpu", "cuda"))
    lines = [json.loads(l) for l in (finished/"predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(set(l) == {"input", "output", "prediction"} for l in lines)
    assert all(l["input"].startswith("Below is an instruction") and l["input"] not in l["prediction"] for l in lines)


def test_completed_run_is_not_trained_again(data, finished):
    before = listing(finished)
    rc, _, err = qlora_nb("train", *flags(data, finished, "--do_eval", "--do_predict"))
    assert rc == 0
    assert "holds a completed run" in err and "--start_over" in err
    assert listing(finished) == before


def test_start_over_trains_again(data, finished, tmp_path):
    out = tmp_path/"again"
    import shutil; shutil.copytree(finished, out)
    rc, _, err = qlora_nb("train", *flags(data, out, "--do_eval", "--do_predict", "--start_over"))
    assert rc == 0, err[-3000:]
    assert "--start_over: removed" in err
    old, new = load_file(finished/"adapter_model"/"adapter_model.safetensors"), load_file(out/"adapter_model"/"adapter_model.safetensors")
    assert max((old[k] - new[k]).abs().max().item() for k in old) == 0  # same seed, same run
    assert (out/"metrics.json").stat().st_mtime_ns > (finished/"metrics.json").stat().st_mtime_ns


# Bad input, in this process through the command line's own `main` (a process each would only add start-up time);
# the exit status and the one-line message are what a user sees.

def cli(capsys, *args):
    from qlora_nb.cli import main
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_output_dir_that_is_a_file(data, tmp_path, capsys):
    (tmp_path/"taken").write_text("mine")
    rc, err = cli(capsys, "train", *flags(data, tmp_path/"taken"))
    assert rc == 2 and "output_dir" in err and "is a file, not a folder" in err
    assert (tmp_path/"taken").read_text() == "mine"


def test_output_dir_below_a_file(data, tmp_path, capsys):
    (tmp_path/"taken").write_text("mine")
    rc, err = cli(capsys, "train", *flags(data, tmp_path/"taken"/"run"))
    assert rc == 2 and "cannot be created" in err


def test_output_dir_not_writable(data, tmp_path, capsys):
    if os.geteuid() == 0: target = Path("/proc/qlora-nb-run")  # root may write anywhere else
    else: locked = tmp_path/"locked"; locked.mkdir(mode=0o500); target = locked/"run"
    rc, err = cli(capsys, "train", *flags(data, target))
    assert rc == 2 and "is not writable" in err and "choose a folder you can write to" in err
    assert not target.exists()


@pytest.mark.parametrize("text, message", [
    ("max_steps: [4\n", "is not valid YAML"),
    ("max_stepz: 4\n", "--max_stepz (did you mean --max_steps?)"),
])
def test_bad_config_file(data, tmp_path, capsys, text, message):
    config = tmp_path/"run.yaml"
    config.write_text(text)
    rc, err = cli(capsys, "train", "--config", str(config), *flags(data, tmp_path/"out"))
    assert rc == 2 and message in err.splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_bad_input_exit_status_from_a_real_process(data, tmp_path):
    (tmp_path/"taken").write_text("")
    rc, _, err = qlora_nb("train", *flags(data, tmp_path/"taken"))
    assert rc == 2 and err.startswith("qlora-nb: error: output_dir") and err.count("\n") == 1
