"""Exact resume with real process kills: `python -m qlora_nb train` is SIGKILLed after a checkpoint, or in the
middle of writing one, started again with the same command, and must end with the adapter of a run that was never
interrupted. Also: a damaged checkpoint, or --max_steps behind the checkpoint, stops with a message and exit 2."""
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qlora_nb.tiny import tiny_model_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
STEPS, SAVE_EVERY = 12, 4


def flags(data, out, *more):
    return ["train", "--model_name_or_path", str(tiny_model_path()), "--dataset", str(data), "--output_dir", str(out),
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--max_steps", str(STEPS),
            "--save_steps", str(SAVE_EVERY), "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--source_max_len", "48",
            "--target_max_len", "24", "--disable_tqdm", "true", "--seed", "7", *more]


def start(args, prelude=""):
    "`python -m qlora_nb ARGS` as a child process (`prelude`: Python run first in the same process)."
    code = prelude + "\nimport sys, runpy; sys.argv = ['qlora_nb'] + sys.argv[1:]; runpy.run_module('qlora_nb', run_name='__main__')"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(args, prelude="", timeout=300):
    p = start(args, prelude)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for(path, proc, timeout=240):
    "Poll until `path` exists; fail if the child exits first."
    end = time.time() + timeout
    while not Path(path).exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < end, f"{path} did not appear in {timeout}s"
        time.sleep(0.02)


def kill(proc):
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


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
    rc, _, err = run(flags(data, out))
    assert rc == 0, err[-3000:]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    return out


def test_sigkill_after_a_checkpoint_resumes_exactly(data, reference, tmp_path):
    out = tmp_path/"run"
    proc = start(flags(data, out))
    wait_for(out/"checkpoint-4", proc)
    kill(proc)
    assert not (out/"completed").exists() and not (out/"adapter_model").exists()
    rc, _, err = run(flags(data, out))  # the same command again
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


def test_sigkill_while_writing_a_checkpoint(data, reference, tmp_path, monkeypatch):
    out, flag = tmp_path/"run", tmp_path/"hanging"
    monkeypatch.setitem(ENV, "HANG_FLAG", str(flag))
    proc = start(flags(data, out), HANG_WHILE_SAVING)
    wait_for(flag, proc)
    kill(proc)
    # transformers alone would now have a checkpoint-8/ without scheduler, random state or trainer state
    assert not (out/"checkpoint-8").exists()
    assert (out/".incomplete"/"checkpoint-8"/"optimizer.pt").exists()
    assert not (out/".incomplete"/"checkpoint-8"/"trainer_state.json").exists()
    rc, _, err = run(flags(data, out))
    assert rc == 0, err[-3000:]
    assert "removed checkpoint-8 from" in err and "stopped while writing it" in err
    assert f"resuming from {out/'checkpoint-4'}" in err
    assert max_difference(adapter(out), adapter(reference)) <= 1e-6
    assert losses(out) == losses(reference)
    assert not (out/".incomplete").exists()


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*"))


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
    rc, _, err = run(flags(data, out))
    assert rc == 2, err[-3000:]
    assert f"Cannot resume from {out/'checkpoint-8'}: {problem}" in err
    assert "Delete that folder to resume from checkpoint-4, or pass --start_over" in err
    assert listing(out) == before  # nothing written


def test_max_steps_behind_the_checkpoint(data, reference, tmp_path):
    out = tmp_path/"run"
    shutil.copytree(reference/"checkpoint-8", out/"checkpoint-8")
    before = listing(out)
    rc, _, err = run(flags(data, out, "--max_steps", "6"))
    assert rc == 2
    assert "checkpoint-8 is at step 8, past --max_steps 6: pass --max_steps 8 or more" in err
    assert listing(out) == before
