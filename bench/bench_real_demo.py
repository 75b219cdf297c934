"""The real-model demo under torch's CPU kernel sets, thread counts and seeds: does its promise hold, and by how much?

    python bench/bench_real_demo.py --model "$(qlora-nb get-model)"           # 3 kernel sets x 1, 2 threads x 3 seeds
    python bench/bench_real_demo.py --model M --settings avx512-t2-s0 avx2-t1-s1 default-t1-s2   # chosen settings

Each setting runs `qlora_nb.real_demo.real_demo_main` in its own process (`python -c`, so the CLI's wiring does not
matter) with:
  ATEN_CPU_CAPABILITY  default (no vector kernels), avx2, avx512: the kernel sets torch chooses among by processor
  threads              OMP_NUM_THREADS / MKL_NUM_THREADS = 1 or 2 (OMP_WAIT_POLICY=PASSIVE: no spinning on shared cores)
  seed                 --seed: the QLoRA run's seed (LoRA initialisation, batch order); data and questions stay
For each: the figures (taught, kept, perplexity, before and after), the smallest margin to `REAL_PROMISE`, the
wall time and the CPU time of the process. 2-thread settings run one at a time, 1-thread ones two at a time (2 cores).
It is a benchmark, not a test: it prints a table and writes bench/_work/real_demo/results.json (git-ignored).
"""
import argparse, concurrent.futures, json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT/"bench"/"_work"/"real_demo"
RUN = "import sys; from qlora_nb.real_demo import real_demo_main; sys.exit(real_demo_main(sys.argv[1:]))"


def run_setting(name: str, model: str) -> dict:
    "One demo in a fresh process for setting `name` (capability-tTHREADS-sSEED); its figures, margins and times."
    capability, threads, seed = name.split("-"); threads, seed = int(threads[1:]), int(seed[1:])
    folder = WORK/name
    shutil.rmtree(folder, ignore_errors=True); folder.mkdir(parents=True)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    start = time.time()
    with open(folder/"log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUN, "--output_dir", str(folder/"out"), "--seed", str(seed),
                                 "--model_name_or_path", model], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, even with two running at once
    row = dict(setting=name, rc=os.waitstatus_to_exitcode(status), wall_s=time.time() - start,
               cpu_s=usage.ru_utime + usage.ru_stime)
    metrics = folder/"out"/"metrics.json"
    if row["rc"] == 0 and metrics.is_file():
        demo = json.loads(metrics.read_text())["real_demo"]
        row |= dict(figures=demo["figures"], margins=demo["margins"], torch_kernels=json.loads(metrics.read_text())
                    .get("cpu_kernels", {}).get("torch"))
    return row


def show(row: dict) -> str:
    if "figures" not in row: return f"{row['setting']:<16} FAILED (exit {row['rc']}), see {WORK/row['setting']}/log.txt"
    f, m = row["figures"], row["margins"]
    return (f"{row['setting']:<16} {row['torch_kernels'] or '?':<8} taught {f['taught_before']:.2f}->{f['taught_after']:.2f}"
            f"  kept {f['kept_after']:.2f} of {f['kept_questions']}  general {f['general_before']:.2f}->"
            f"{f['general_after']:.2f}  ppl {f['perplexity_before']:.2f}->{f['perplexity_after']:.2f} "
            f"({f['perplexity_rise']:+.1%})  min margin {min(m.values()):+.3f} ({min(m, key=m.get)})"
            f"  {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the SmolLM2-135M-Instruct folder")
    p.add_argument("--settings", nargs="*", help="names such as avx2-t1-s0; default: the whole grid")
    a = p.parse_args(argv)
    names = a.settings or [f"{c}-t{t}-s{s}" for t in (2, 1) for s in (0, 1, 2) for c in ("avx512", "avx2", "default")]
    rows = []
    for name in [n for n in names if "-t1-" not in n]:
        rows.append(run_setting(name, a.model)); print(show(rows[-1]), flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for row in pool.map(lambda n: run_setting(n, a.model), [n for n in names if "-t1-" in n]):
            rows.append(row); print(show(row), flush=True)
    margins = [r["margins"] for r in rows if "margins" in r]
    if margins: print("smallest margin of each promise:", {k: round(min(m[k] for m in margins), 3) for k in margins[0]})
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK/"results.json").write_text(json.dumps(rows, indent=1))
    return 0 if len(margins) == len(rows) and all(v > 0 for m in margins for v in m.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
