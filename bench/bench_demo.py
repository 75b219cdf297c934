"""The demo under every torch CPU kernel set, thread count and seed: does it hold, and by how much?

    python bench/bench_demo.py                       # 3 kernel sets x 1 and 2 threads x 5 seeds: about an hour
    python bench/bench_demo.py --seeds 0 --threads 1 # one seed, one thread count: a quick look
    python bench/bench_demo.py --no-write            # print the table without updating bench/RESULTS.md

Each setting runs `qlora-nb demo --seed S` exactly as the README does, in its own process and with a fresh cache
(`QLORA_NB_CACHE`), so the base model is pretrained under the same kernels and threads as the QLoRA run:
  ATEN_CPU_CAPABILITY  default (no vector kernels), avx2, avx512: the kernel sets torch chooses among by processor
                       (one machine runs all three; on a CPU without AVX-512 torch falls back to the best it has,
                       which the table says). bitsandbytes picks its own CPU code by the processor's features
                       (AVX512-BF16), which no setting changes: the table names the CPU and those features.
  threads              OMP_NUM_THREADS / MKL_NUM_THREADS = 1 or 2: the sums inside a matmul split differently.
  seed                 `qlora-nb demo --seed`: pretraining, fine-tuning and their data (the evaluation stays).
For each: the taught subject before and after, each kept subject before and after, how far the training loss fell, and
the smallest accuracy margin to `qlora_nb.demo.PROMISE` (what `scripts/check_demo.py` holds CI's demo to; positive:
kept). The 2-thread settings run one at a time, the 1-thread ones two at a time (2 cores). It is a benchmark, not a
test: it prints figures and writes its section of bench/RESULTS.md. Run folders and logs go to bench/_work/demo/
(git-ignored).
"""
import argparse, concurrent.futures, datetime, json, os, platform, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qlora_nb.demo import BASE_SUBJECTS, NEW_SUBJECT, PROMISE, loss_before_after, promise_margins  # noqa: E402
from bench_train import write_results  # the one writer of bench/RESULTS.md's generated sections  # noqa: E402

WORK = ROOT/"bench"/"_work"/"demo"
MARK_START, MARK_END = "<!-- bench_demo:start -->", "<!-- bench_demo:end -->"
CAPABILITIES = ["default", "avx2", "avx512"]


def cpu_description() -> str:
    "The processor's name and the features that decide torch's and bitsandbytes' CPU code."
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores; features: {', '.join(has) or 'none of avx2/avx512'}"


def run_setting(capability: str, threads: int, seed: int) -> dict:
    "One `qlora-nb demo` in a fresh process and cache; its figures."
    name = f"{capability}-t{threads}-s{seed}"
    folder = WORK/name
    shutil.rmtree(folder, ignore_errors=True); folder.mkdir(parents=True)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",  # no spinning threads on shared cores
           "QLORA_NB_CACHE": str(folder/"cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    start = time.time()
    with open(folder/"log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "qlora_nb", "demo", "--output_dir", str(folder/"out"),
                             "--seed", str(seed)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    row = dict(setting=name, capability=capability, threads=threads, seed=seed, rc=rc, seconds=time.time() - start)
    if rc != 0: return row
    out = folder/"out"
    before, after = (json.loads((out/n).read_text()) for n in ("mmlu_eval_before.json", "mmlu_eval.json"))
    losses = loss_before_after(json.loads((out/"trainer_state.json").read_text()))
    acc = lambda r, s: r["per_subject"][s]["accuracy"]
    figures = {s: [acc(before, s), acc(after, s)] for s in [NEW_SUBJECT, *BASE_SUBJECTS]}
    return with_margins({**row, "accuracy": figures, "losses": list(losses)})


def run_grid(capabilities, threads, seeds) -> list:
    "Every setting: the 2-thread ones one at a time, then the 1-thread ones two at a time."
    jobs = [(c, t, s) for t in sorted(threads, reverse=True) for s in seeds for c in capabilities]
    rows = []
    def done(row):
        rows.append(row)
        figures = "FAILED (exit %d)" % row["rc"] if row["rc"] else \
            " ".join(f"{s} {a[0]:.2f}->{a[1]:.2f}" for s, a in row["accuracy"].items())
        print(f"[{len(rows)}/{len(jobs)}] {row['setting']:<18} {row['seconds']:5.0f} s  {figures}", flush=True)
    for job in [j for j in jobs if j[1] > 1]: done(run_setting(*job))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for row in pool.map(lambda j: run_setting(*j), [j for j in jobs if j[1] == 1]): done(row)
    return sorted(rows, key=lambda r: (r["capability"], r["threads"], r["seed"]))


def with_margins(row: dict) -> dict:
    "`row` with its margins to today's `PROMISE`, recomputed from its figures, and the smallest accuracy margin."
    if row["rc"]: return row
    results = [{"per_subject": {s: {"accuracy": a[i]} for s, a in row["accuracy"].items()}} for i in (0, 1)]
    margins = promise_margins(*results, row["losses"])
    accuracy = {k: v for k, v in margins.items() if k != "loss fall"}  # the loss's margin is a ratio, not comparable
    return {**row, "margins": margins, "worst": min(accuracy, key=accuracy.get)}


def table(rows: list) -> str:
    "The Markdown section for bench/RESULTS.md (also printed)."
    rows = [with_margins(r) for r in rows]
    date = datetime.date.today().isoformat()
    kept = " | ".join(f"{s} before | {s} after" for s in BASE_SUBJECTS)
    lines = [MARK_START, f"## The demo under every CPU kernel set (`python bench/bench_demo.py`, {date})", "",
             f"Machine: {cpu_description()}. Each row is `qlora-nb demo --seed S` in its own process with a fresh "
             "cache (the base pretrained under the same kernels and threads). Margin: the smallest distance to "
             f"`qlora_nb.demo.PROMISE` {PROMISE} (positive: kept), and which figure it is.", "",
             f"| ATEN_CPU_CAPABILITY | threads | seed | {NEW_SUBJECT} before | {NEW_SUBJECT} after | {kept} | "
             "loss fall | margin | s |", "|---|---:|---:|" + "---:|" * (4 + 2 * len(BASE_SUBJECTS)) + "---:|"]
    for r in rows:
        if r["rc"]:
            lines.append(f"| {r['capability']} | {r['threads']} | {r['seed']} | failed: exit {r['rc']} |"); continue
        accs = " | ".join(f"{a[0]:.2f} | {a[1]:.2f}" for a in r["accuracy"].values())
        fall = r["losses"][0] / r["losses"][1]
        lines.append(f"| {r['capability']} | {r['threads']} | {r['seed']} | {accs} | {fall:.0f}x | "
                     f"{r['margins'][r['worst']]:+.2f} ({r['worst']}) | {r['seconds']:.0f} |")
    ok = [r for r in rows if not r["rc"]]
    if ok:
        lines += ["", "Range over all settings (min / median / max):", ""]
        for s in [NEW_SUBJECT, *BASE_SUBJECTS]:
            for i, when in enumerate(("before", "after")):
                v = sorted(r["accuracy"][s][i] for r in ok)
                lines.append(f"- {s} {when}: {v[0]:.2f} / {v[len(v) // 2]:.2f} / {v[-1]:.2f}")
        worst = min(ok, key=lambda r: r["margins"][r["worst"]])
        falls = sorted(r["losses"][0] / r["losses"][1] for r in ok)
        lines.append(f"- loss fall (first 3 logged / last 3): {falls[0]:.0f}x / {falls[len(falls) // 2]:.0f}x / "
                     f"{falls[-1]:.0f}x")
        lines.append(f"- smallest accuracy margin: {worst['margins'][worst['worst']]:+.2f} ({worst['worst']}, "
                     f"{worst['setting']}); settings that broke the promise: "
                     f"{sum(1 for r in ok if min(r['margins'].values()) <= 0)} of {len(rows)}, failed runs: "
                     f"{len(rows) - len(ok)}")
    return "\n".join(lines + ["", MARK_END])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capabilities", default=",".join(CAPABILITIES), help="ATEN_CPU_CAPABILITY values, comma-separated")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--seeds", default="0,1,2,3,4", help="`qlora-nb demo --seed` values, comma-separated")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    opts = p.parse_args(argv)
    rows = run_grid(opts.capabilities.split(","), [int(t) for t in opts.threads.split(",")],
                    [int(s) for s in opts.seeds.split(",")])
    (WORK/"results.json").write_text(json.dumps(rows, indent=1))
    section = table(rows)
    print(section)
    if not opts.no_write: write_results(section, MARK_START, MARK_END)
    return 0 if all(not r["rc"] and min(with_margins(r)["margins"].values()) > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
