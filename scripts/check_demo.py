"""Check what `bash scripts/demo.sh` left in its output folder (CI runs it after the demo, as a newcomer would look).

usage: python scripts/check_demo.py DEMO_OUTPUT_DIR DEMO_STDOUT_LOG
Exits 1 with one line per problem; prints the figures it checked otherwise. What a demo must show is held once, in
its module: for the real chat model `qlora_nb.real_demo` (`REAL_PROMISE`, `real_demo_problems`,
nbs/12a_real_demo.ipynb: the invented facts learned on questions never trained on, the general questions the base
knew still answered, ordinary text no more surprising than the promise allows); for the tiny demo (`qlora-nb demo
--tiny`, or where the real model cannot be fetched) `qlora_nb.demo` (`PROMISE`, `demo_problems`, nbs/12_demo.ipynb)."""
import json, sys
from pathlib import Path


def check_real(out: Path, log: str) -> list:
    from qlora_nb.real_demo import real_demo_problems, real_figures
    if bad := real_demo_problems(out, log): return bad
    f = real_figures(*(json.loads((out/n).read_text()) for n in ("eval_before.json", "eval_after.json")))
    print(f"demo check passed (SmolLM2): taught {f['taught_before']:.2f} -> {f['taught_after']:.2f}; kept "
          f"{f['kept_after']:.2f} of the {f['kept_questions']} general questions the base knew; perplexity "
          f"{f['perplexity_before']:.2f} -> {f['perplexity_after']:.2f}")
    return []


def check_tiny(out: Path, log: str) -> list:
    from qlora_nb.demo import DEMO_FILES, NEW_SUBJECT, demo_problems
    if bad := demo_problems(out, log): return bad
    before, after = (json.loads((out/n).read_text()) for n in ("mmlu_eval_before.json", "mmlu_eval.json"))
    acc = lambda r, s: f"{r['per_subject'][s]['accuracy']:.2f}"
    kept = ", ".join(f"{s} {acc(after, s)}" for s in after["per_subject"] if s != NEW_SUBJECT)
    print(f"demo check passed (tiny): {len(DEMO_FILES)} files; {NEW_SUBJECT} {acc(before, NEW_SUBJECT)} -> "
          f"{acc(after, NEW_SUBJECT)}; kept: {kept}")
    return []


if __name__ == "__main__":
    out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
    real = "QLoRA real-model demo" in log or (out/"eval_before.json").is_file()  # which demo ran: its own words
    if bad := (check_real if real else check_tiny)(out, log):
        print("\n".join(f"demo check FAILED: {p}" for p in bad)); sys.exit(1)
