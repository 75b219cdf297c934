"""Check what `bash scripts/demo.sh` left in its output folder (CI runs it after the demo, as a newcomer would look).

usage: python scripts/check_demo.py DEMO_OUTPUT_DIR DEMO_STDOUT_LOG
Exits 1 with one line per problem; prints the figures it checked otherwise. What a demo must show is held once, in
`qlora_nb.demo` (`PROMISE`, `demo_problems`, nbs/12_demo.ipynb): its files, the subject only fine-tuning teaches from
chance to learned, the pretrained subjects kept, and the training loss fallen."""
import json, sys
from pathlib import Path

from qlora_nb.demo import DEMO_FILES, NEW_SUBJECT, demo_problems

if __name__ == "__main__":
    out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
    if bad := demo_problems(out, log):
        print("\n".join(f"demo check FAILED: {p}" for p in bad)); sys.exit(1)
    before, after = (json.loads((out/n).read_text()) for n in ("mmlu_eval_before.json", "mmlu_eval.json"))
    acc = lambda r, s: f"{r['per_subject'][s]['accuracy']:.2f}"
    kept = ", ".join(f"{s} {acc(after, s)}" for s in after["per_subject"] if s != NEW_SUBJECT)
    print(f"demo check passed: {len(DEMO_FILES)} files; {NEW_SUBJECT} {acc(before, NEW_SUBJECT)} -> "
          f"{acc(after, NEW_SUBJECT)}; kept: {kept}")
