"""`qlora-nb train` end to end as a user runs it: a real process on the tiny model and a local Alpaca file writes
the adapter, metrics.json and predictions.jsonl; a completed run is not trained again; --start_over retrains;
bad input gives a one-line message, exit 2, and writes nothing; Ctrl-C stops a run with exit 130 and a note that
rerunning resumes it."""
import json, os, re, signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import CTRL_C_REACHES, listing, run_qlora_nb, start_qlora_nb, tiny_flags, wait_for
from qlora_nb.tiny import tiny_model_path

flags = tiny_flags
qlora_nb = run_qlora_nb


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




def own_words(err: str) -> bool:
    "Whether every line of `err` is qlora-nb's own (no library's warning, no traceback)."
    return all(line.startswith("qlora-nb: ") for line in err.splitlines())


def test_bad_input_exit_status_from_a_real_process(data, tmp_path):
    (tmp_path/"taken").write_text("")
    rc, _, err = qlora_nb("train", *flags(data, tmp_path/"taken"))
    assert rc == 2 and err.startswith("qlora-nb: error: output_dir") and err.count("\n") == 1, err
    assert own_words(err), err
    assert (tmp_path/"taken").read_text() == ""


def test_misspelled_flag_from_a_real_process(tmp_path):
    rc, out, err = qlora_nb("train", "--lora_rank", "8", "--output_dir", str(tmp_path/"run"), timeout=60)
    assert (rc, out) == (2, "") and own_words(err) and err.count("\n") == 1, err
    assert "--lora_rank (did you mean --lora_r?)" in err
    assert not (tmp_path/"run").exists()


# Every bad input of issue 11, section 3, through the command line's own `main`: one line naming the fix, exit 2, and
# nothing created or changed (the output folder does not appear; the data file and the config file are as they were).

@pytest.mark.parametrize("more, message", [
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1 example, got 0"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be at least 1 example, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1"),
    (["--learning_rate", "-1"], "learning_rate must be positive, got -1.0: qlora.py uses 2e-4"),
    (["--max_steps", "-5", "--num_train_epochs", "0"], "max_steps must be a positive number of optimizer steps, or -1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "Nothing to train: --max_steps -1 and --num_train_epochs 0"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-4"], "qlora-nb resumes by itself from the last checkpoint"),
    (["--lora_alpha", "-16"], "lora_alpha must be positive"),
    (["--warmup_steps", "5", "--max_steps", "2"], "--warmup_steps 5 is longer than the whole run (--max_steps 2)"),
    (["--save_steps", "0"], "save_steps must be positive"),
    (["--max_new_tokens", "0"], "`max_new_tokens` must be greater than 0"),
    (["--lora_rank", "8"], "--lora_rank (did you mean --lora_r?)"),
])
def test_bad_setting(data, tmp_path, capsys, more, message):
    before = data.read_bytes()
    rc, err = cli(capsys, "train", *flags(data, tmp_path/"out", *more))
    assert rc == 2 and err.startswith("qlora-nb: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path/"out").exists() and data.read_bytes() == before


def test_every_answer_empty(tmp_path, capsys):
    data = tmp_path/"blank.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": ""} for i in range(12)]))
    rc, err = cli(capsys, "train", *flags(data, tmp_path/"out"))
    last = err.strip().splitlines()[-1]  # above it: datasets' progress bars while the file is read
    assert rc == 2 and last.startswith("qlora-nb: error: ") and err.count("qlora-nb: error") == 1, err
    assert f"{data}: every answer is empty: the 'output' of all 12 training examples is blank" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.json"]


def test_a_lone_double_dash_is_dropped(data, tmp_path, capsys):
    "`train -- --flags`: the flags after `--` are read as flags (here the output_dir's check proves they were)."
    (tmp_path/"taken").write_text("mine")
    rc, err = cli(capsys, "train", "--", *flags(data, tmp_path/"taken"))
    assert rc == 2 and "output_dir" in err and "is a file, not a folder" in err and "Unknown setting" not in err


@pytest.mark.parametrize("text, message", [
    ("max_steps: [4\n", "is not valid YAML"),
    ("max_stepz: 4\n", "--max_stepz (did you mean --max_steps?)"),
    ("", "is empty (or only comments): write one `name: value` line per setting"),
    ("lora_rank: 8\n", "--lora_rank (did you mean --lora_r?)"),
    ("- 8\n", "must hold `name: value` lines, such as `lora_r: 64`, but it holds a list"),
])
def test_bad_config_file(data, tmp_path, capsys, text, message):
    config = tmp_path/"run.yaml"
    config.write_text(text)
    rc, err = cli(capsys, "train", "--config", str(config), *flags(data, tmp_path/"out"))
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"] and config.read_text() == text


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_mmlu_output_dir_checked_before_evaluation(tmp_path, capsys, where):
    (tmp_path/"taken").write_text("mine")
    out = tmp_path/"taken" if where == "file" else tmp_path/"taken"/"run"
    # no MMLU files and no model: the output folder is refused before either is looked for
    rc, err = cli(capsys, "mmlu", "--model_name_or_path", str(tmp_path/"no_model"), "--mmlu_path", str(tmp_path/"no_mmlu"),
                  "--output_dir", str(out))
    assert rc == 2 and err.startswith(f"qlora-nb: error: output_dir {out}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (tmp_path/"taken").read_text() == "mine"


def test_ctrl_c_stops_with_a_note_that_rerunning_resumes(data, tmp_path):
    out = tmp_path/"run"
    proc = start_qlora_nb("train", *flags(data, out, max_steps=400, save_steps=2), prelude=CTRL_C_REACHES)
    try: wait_for(out/"checkpoint-2", proc)
    except BaseException: proc.kill(); proc.communicate(); raise
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.splitlines()[-1]
    m = re.fullmatch(r"qlora-nb: training interrupted\. Run the same command again to resume from (.+) \(the last checkpoint\)\.", last)
    assert m, last
    named = Path(m[1])
    assert named.parent == out and named.is_dir() and named == max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert not (out/"completed").exists()
