"""Start-up benchmark: how long `qlora-nb` takes to answer what needs no model.

    python bench/bench_startup.py              # 5 rounds of each command line, best and median wall seconds
    python bench/bench_startup.py --rounds 9

Each command line runs as a fresh `python -m qlora_nb ...` process, as a user's shell starts it:
  (nothing)            the usage, exit 2
  --help               the usage
  train --help         every flag of `qlora-nb train` (from the cached flag table: see nbs/13_cli.ipynb)
  train --lora_rr 3    a misspelled flag, exit 2 with "did you mean --lora_r?"
  train --config F     a misspelled key (`lora_rank: 8`) in a config file, exit 2 with "did you mean --lora_r?"
  mmlu --help          the usage of `qlora-nb mmlu`
and, for scale, `python -c pass` (the interpreter alone) and `import transformers.training_args` (what answering used
to wait for). The first round after a change to qlora_nb/config.py or transformers builds the flag table (seconds);
it is run once untimed first, as it is on the first command after installing. It is a benchmark, not a test.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CASES = {
    "python -c pass": ["-c", "pass"],
    "qlora-nb": ["-m", "qlora_nb"],
    "qlora-nb --help": ["-m", "qlora_nb", "--help"],
    "qlora-nb train --help": ["-m", "qlora_nb", "train", "--help"],
    "qlora-nb train --lora_rr 3": ["-m", "qlora_nb", "train", "--lora_rr", "3"],
    "qlora-nb train --config typo.yaml": ["-m", "qlora_nb", "train", "--config", "TYPO_YAML"],
    "qlora-nb mmlu --help": ["-m", "qlora_nb", "mmlu", "--help"],
    "import transformers.training_args": ["-c", "import transformers.training_args"],
}


def seconds(args) -> float:
    "Wall seconds of one fresh process running `python ARGS`."
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    rounds = p.parse_args().rounds
    typo = Path(tempfile.mkdtemp())/"typo.yaml"
    typo.write_text("lora_rank: 8\n")
    CASES["qlora-nb train --config typo.yaml"][-1] = str(typo)
    seconds(CASES["qlora-nb train --help"])  # builds the flag table if this config.py/transformers has none yet
    times = {name: [] for name in CASES}
    for _ in range(rounds):  # interleaved, so a busy moment of a shared machine hits every case alike
        for name, args in CASES.items(): times[name].append(seconds(args))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{rounds} rounds, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'command line':<36} {'best s':>7} {'median s':>9}")
    for name, t in times.items(): print(f"{name:<36} {min(t):7.2f} {statistics.median(t):9.2f}")


if __name__ == "__main__":
    main()
