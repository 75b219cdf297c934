"""Exact resume with real process kills: `python -m qlora_nb train` is SIGKILLed after a checkpoint, or in the
middle of writing one, started again with the same command, and must end with the adapter of a run that was never
interrupted. A run killed after its last checkpoint (during evaluation or prediction) is finished from it without
training. Also: a damaged checkpoint, --max_steps behind the checkpoint, or settings other than the checkpoint's stop
with a message and exit 2, writing nothing."""
import json, shutil, textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import kill, listing, run_qlora_nb, start_qlora_nb, tiny_flags, wait_for
from qlora_nb.runs import list_checkpoints

STEPS, SAVE_EVERY = 12, 4
RUN = dict(max_steps=STEPS, save_steps=SAVE_EVERY, lora_dropout=0.1, gradient_accumulation_steps=2, seed=7)


def flags(data, out, *more, **overrides):
    "The run every test makes: 12 steps, a checkpoint every 4, evaluation and predictions at the end."
    return ["train", *tiny_flags(data, out, "--do_eval", "--do_predict", *more, **{**RUN, **overrides})]


def adapter(out):
    return load_file(Path(out)/"adapter_model"/"adapter_model.safetensors")


def losses(out):
    state = json.loads((Path(out)/"trainer_state.json").read_text())
    return state["global_step"], [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def max_difference(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(alpaca_file): return alpaca_file(80)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    "A run that was never interrupted."
    out = tmp_path_factory.mktemp("reference")/"run"
    rc, _, err = run_qlora_nb(*flags(data, out))
    assert rc == 0, err[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    return out


def metrics(out): return json.loads((Path(out)/"metrics.json").read_text())["metrics"]


def test_sigkill_after_a_checkpoint_resumes_exactly(data, reference, tmp_path):
    out = tmp_path/"run"
    proc = start_qlora_nb(*flags(data, out))
    wait_for(out/"checkpoint-4", proc)
    kill(proc)
    assert not (out/"completed").exists() and not (out/"adapter_model").exists()
    rc, _, err = run_qlora_nb(*flags(data, out))  # the same command again
    assert rc == 0, err[-3000:]
    assert "resuming from" in err and "checkpoint-" in err
    assert max_difference(adapter(out), adapter(reference)) <= 1e-6
    assert losses(out) == losses(reference)  # same step count, same loss at every step
    assert (out/"completed").exists()


# Runs in the child process: writing optimizer.pt of checkpoint-8 announces itself and then hangs, so the test can
# kill the process in the middle of the checkpoint write, deterministically.
HANG_WHILE_SAVING = textwrap.dedent("""
    import os, time, torch
    _save = torch.save
    def save(obj, f, *a, **k):
        _save(obj, f, *a, **k)
        if str(f).endswith(os.path.join("checkpoint-8", "optimizer.pt")):
            open(os.environ["HANG_FLAG"], "w").close()
            time.sleep(3600)
    torch.save = save
""")


def test_sigkill_while_writing_a_checkpoint(data, reference, tmp_path):
    out, flag = tmp_path/"run", tmp_path/"hanging"
    proc = start_qlora_nb(*flags(data, out), prelude=HANG_WHILE_SAVING, env={"HANG_FLAG": str(flag)})
    wait_for(flag, proc)
    kill(proc)
    # transformers alone would now have a checkpoint-8/ without scheduler, random state or trainer state
    assert not (out/"checkpoint-8").exists()
    assert (out/".incomplete"/"checkpoint-8"/"optimizer.pt").exists()
    assert not (out/".incomplete"/"checkpoint-8"/"trainer_state.json").exists()
    rc, _, err = run_qlora_nb(*flags(data, out))
    assert rc == 0, err[-3000:]
    assert "removed checkpoint-8 from" in err and "stopped while writing it" in err
    assert f"resuming from {out/'checkpoint-4'}" in err
    assert max_difference(adapter(out), adapter(reference)) <= 1e-6
    assert losses(out) == losses(reference)
    assert not (out/".incomplete").exists()


# Runs in the child process: the evaluation (or the writing of the predictions) after training announces itself and
# hangs, so the test can kill the process after checkpoint-12, the last one, and before `completed`.
HANG_AFTER_TRAINING = textwrap.dedent("""
    import os, time
    def _hang(*a, **k): open(os.environ["HANG_FLAG"], "w").close(); time.sleep(3600)
    if os.environ["HANG_IN"] == "evaluation":
        import transformers; transformers.Trainer.evaluate = _hang
    else:
        import qlora_nb.predict; qlora_nb.predict.write_jsonl_atomic = _hang
""")


@pytest.mark.parametrize("stage", ["evaluation", "prediction"])
def test_sigkill_after_the_last_checkpoint_finishes_without_training(data, reference, tmp_path, stage):
    out, flag = tmp_path/"run", tmp_path/"hanging"
    env = {"HANG_FLAG": str(flag), "HANG_IN": stage}
    proc = start_qlora_nb(*flags(data, out), prelude=HANG_AFTER_TRAINING, env=env)
    wait_for(flag, proc)
    kill(proc)
    assert (out/"checkpoint-12").is_dir() and not (out/"completed").exists() and not (out/"metrics.json").exists()
    rc, _, err = run_qlora_nb(*flags(data, out))  # the same command again
    assert rc == 0, err[-3000:]
    assert f"{out/'checkpoint-12'} is the run's last step (12): finishing the run from it without training" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]  # no 13th step
    assert max_difference(adapter(out), adapter(reference)) == 0.0
    assert losses(out) == losses(reference)
    finished, whole = metrics(out), metrics(reference)
    assert finished["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    assert finished["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-5)  # the mean over the 12 logged steps
    assert finished["epoch"] == whole["epoch"] and "train_runtime" not in finished  # nothing was trained or timed
    assert (out/"predictions.jsonl").read_text() == (reference/"predictions.jsonl").read_text()
    assert (out/"completed").exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda ck: (ck/"optimizer.pt").write_bytes((ck/"optimizer.pt").read_bytes()[:100]), "optimizer.pt is incomplete or corrupt"),
    (lambda ck: (ck/"trainer_state.json").unlink(), "trainer_state.json is missing"),  # what transformers' own save leaves
    (lambda ck: (ck/"adapter_model"/"adapter_model.safetensors").write_bytes(b"x" * 10),
     "adapter_model/adapter_model.safetensors is incomplete or corrupt"),
])
def test_damaged_checkpoint_stops_with_advice(data, reference, tmp_path, damage, problem):
    out = tmp_path/"run"
    for name in ("checkpoint-4", "checkpoint-8"): shutil.copytree(reference/name, out/name)
    damage(out/"checkpoint-8")
    before = listing(out)
    rc, _, err = run_qlora_nb(*flags(data, out))
    assert rc == 2, err[-3000:]
    assert f"Cannot resume from {out/'checkpoint-8'}: {problem}" in err
    assert "Delete that folder to resume from checkpoint-4, or pass --start_over" in err
    assert listing(out) == before  # nothing written


def test_max_steps_behind_the_checkpoint(data, reference, tmp_path):
    out = tmp_path/"run"
    shutil.copytree(reference/"checkpoint-8", out/"checkpoint-8")
    before = listing(out)
    rc, _, err = run_qlora_nb(*flags(data, out, max_steps=6))
    assert rc == 2
    assert "checkpoint-8 is at step 8, past --max_steps 6: pass --max_steps 8 or more" in err
    assert listing(out) == before


@pytest.mark.parametrize("change, message", [
    (dict(lora_r=8), "was trained with --lora_r 4; this command says --lora_r 8."),  # the adapter stays r=4 regardless
    (dict(quant_type="fp4", learning_rate=1e-4), "was trained with --quant_type nf4 --learning_rate 0.001; "
                                                 "this command says --quant_type fp4 --learning_rate 0.0001."),
])
def test_resuming_with_other_settings_stops(data, reference, tmp_path, change, message):
    out = tmp_path/"run"
    shutil.copytree(reference/"checkpoint-8", out/"checkpoint-8")
    before = listing(out)
    rc, _, err = run_qlora_nb(*flags(data, out, **change))
    assert rc == 2, err[-3000:]
    assert f"{out/'checkpoint-8'} {message}" in err and "pass --" in err and "--start_over" in err
    assert "Traceback" not in err
    assert listing(out) == before  # nothing written


def test_missing_mmlu_files_stop_before_anything_is_created(data, tmp_path):
    "--do_mmlu_eval offline without MMLU files: the message comes before the model loads, and no output_dir is left."
    out = tmp_path/"run"
    rc, _, err = run_qlora_nb(*flags(data, out, "--do_mmlu_eval", "--mmlu_path", str(tmp_path/"nowhere")))
    assert rc == 2, err[-3000:]
    assert "five_shot_mmlu_val.json does not exist. --mmlu_path must be a folder holding qlora.py's files" in err
    assert not out.exists()
