"""Check what `bash scripts/demo.sh` left in its output folder (CI runs it after the demo, as a newcomer would look).

usage: python scripts/check_demo.py DEMO_OUTPUT_DIR DEMO_STDOUT_LOG
Exits 1 with one line per problem; prints the figures it checked otherwise. The thresholds are the ones
tests/test_train_demo.py holds the full demo to: the subject only fine-tuning teaches goes from chance to learned,
the pretrained subjects stay learned, and the training loss falls."""
import json, sys
from pathlib import Path

FILES = ["completed", "metrics.json", "trainer_state.json", "mmlu_eval_before.json", "mmlu_eval.json",
         "adapter_model/adapter_config.json", "adapter_model/adapter_model.safetensors",
         "training_curves.png", "mmlu_per_subject.png"]
PNG = b"\x89PNG\r\n\x1a\n"


def problems(out: Path, log: str) -> list:
    found = [f"{name} is missing" for name in FILES if not (out/name).is_file()]
    if found: return found
    found += [f"{p.name} is not a PNG image" for p in out.glob("*.png") if p.read_bytes()[:8] != PNG]
    if "QLoRA demo finished" not in log: found.append("the summary ('QLoRA demo finished ...') was not printed")
    before, after = (json.loads((out/n).read_text())["per_subject"] for n in ("mmlu_eval_before.json", "mmlu_eval.json"))
    if not before["symbols"]["accuracy"] < 0.45: found.append(f"symbols before fine-tuning: {before['symbols']['accuracy']:.2f}, not near chance")
    if not after["symbols"]["accuracy"] > 0.7: found.append(f"symbols after fine-tuning: {after['symbols']['accuracy']:.2f}, not learned")
    for s in ("digits", "capital_letters"):
        if not after[s]["accuracy"] > 0.8: found.append(f"{s} after fine-tuning: {after[s]['accuracy']:.2f}, forgotten")
    losses = [h["loss"] for h in json.loads((out/"trainer_state.json").read_text())["log_history"] if "loss" in h]
    if not sum(losses[-3:]) < sum(losses[:3]) / 5: found.append(f"training loss did not fall: {losses[:3]} ... {losses[-3:]}")
    record = json.loads((out/"metrics.json").read_text())
    if record.get("demo", {}).get("mmlu_after", {}).get("accuracy") is None: found.append("metrics.json has no demo figures")
    return found


if __name__ == "__main__":
    out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
    if bad := problems(out, log):
        print("\n".join(f"demo check FAILED: {p}" for p in bad)); sys.exit(1)
    after = json.loads((out/"mmlu_eval.json").read_text())
    print(f"demo check passed: {len(FILES)} files; symbols "
          f"{json.loads((out/'mmlu_eval_before.json').read_text())['per_subject']['symbols']['accuracy']:.2f} -> "
          f"{after['per_subject']['symbols']['accuracy']:.2f}; all questions {after['accuracy']:.2f}")
