"""What the process-level tests share, written once and imported as a module (`from helpers import ...`; pytest puts
tests/ on the path): the offline environment a child process gets, the tiny run's flags, and running, stopping and
watching `qlora-nb` in a child process. Fixtures live in conftest.py."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import signal, subprocess, sys, time  # after the environment above: qlora_nb must import offline
from pathlib import Path

from qlora_nb.testing import short_run_flags

ROOT = Path(__file__).resolve().parents[1]
# what a child process gets: offline, this checkout's qlora_nb first, one thread each (2 cores, often 2 processes)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# qlora_nb.testing's short run, shorter still (a process each); each keyword overrides one flag, `*more` adds flags
TINY_RUN = dict(lora_r=4, lora_alpha=8, max_steps=4, save_steps=2, learning_rate=1e-3, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, logging_steps=1, source_max_len=48, target_max_len=24,
                eval_dataset_size=6, max_new_tokens=6, disable_tqdm="true", seed=3)


def tiny_flags(data, out, *more, **overrides) -> list:
    "`qlora-nb train` flags (without the word `train`) for a short run of the tiny model on the data file `data`."
    return short_run_flags(data, out, *more, **{**TINY_RUN, **overrides})


# Ctrl-C. A shell in the background (CI) may start the tests with SIGINT ignored, which a child inherits and Python then
# keeps; a terminal's Ctrl-C raises KeyboardInterrupt, so a child that is sent SIGINT gets Python's own handler back first.
CTRL_C_REACHES = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"


def start_qlora_nb(*args, prelude: str = "", env: dict | None = None, stdin=None, wrap: list = ()) -> subprocess.Popen:
    "`python -m qlora_nb ARGS` as a child process; `prelude` is Python run first in that process (to patch it)."
    # wrap: a command the child runs under (`unshare ...`: as another user, or with a read-only mount)
    code = prelude + "\nimport sys, runpy; sys.argv = ['qlora_nb'] + sys.argv[1:]; runpy.run_module('qlora_nb', run_name='__main__')"
    return subprocess.Popen([*wrap, sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env={**ENV, **(env or {})},
                            text=True, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_qlora_nb(*args, timeout: float = 300, prelude: str = "", env: dict | None = None, wrap: list = ()) -> tuple:
    "Run `python -m qlora_nb ARGS` to the end; returns (exit status, stdout, stderr)."
    proc = start_qlora_nb(*args, prelude=prelude, env=env, wrap=wrap)
    try: out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill(); out, err = proc.communicate()
        raise AssertionError(f"`qlora-nb {' '.join(map(str, args))}` ran past {timeout}s:\n{err[-3000:]}")
    return proc.returncode, out, err


def wait_for(path, proc: subprocess.Popen, timeout: float = 240):
    "Poll until `path` exists; fail if the child exits first."
    end = time.time() + timeout
    while not Path(path).exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < end, f"{path} did not appear in {timeout}s"
        time.sleep(0.02)


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> str:
    "Send `sig` (default SIGKILL: no chance to clean up) and wait for the child; returns its stderr."
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL: assert proc.returncode == -signal.SIGKILL
    return err


def listing(folder) -> list:
    "(path, size, mtime) of everything below `folder`: equal listings mean nothing was written."
    folder = Path(folder)
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def run_python(*args, env: dict | None = None, timeout: float = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    "`python ARGS` (this interpreter) to the end, output captured; the child gets `ENV` unless `env` is given."
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV if env is None else env, timeout=timeout)
