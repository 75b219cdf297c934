"""bench/harness.py, the one harness of the benchmarks: bench_train.py and gpu_check.py keep no copy of its pieces (read
from their source with `ast`, nothing run), its token count agrees with a naive count on a padded batch and on packed
rows, and its worker launcher returns a worker's figures, or its error in one line. Nothing trains."""
import ast, sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1]/"bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402  (bench/ is not a package: the scripts import it the same way)

SHARED = {"count_tokens", "Observer", "run_worker", "worker_main", "child_env", "rss_bytes", "run_qlora_nb",
          "train_trl", "nf4_config", "summarize_profile", "kernel_group", "KERNEL_GROUPS", "measured_weight_bits",
          "IGNORE_INDEX"}


def harness_imports(tree) -> set:
    return {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "harness"
            for a in node.names}


@pytest.mark.parametrize("script", ["bench_train.py", "gpu_check.py"])
def test_scripts_use_the_harness(script):
    tree = ast.parse((BENCH/script).read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
          {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert not own & SHARED, f"{script} defines its own {sorted(own & SHARED)}"
    assert {"Observer", "run_worker", "worker_main", "WORKER", "ROOT"} <= harness_imports(tree), harness_imports(tree)
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "--worker" not in literals and "HF_HUB_OFFLINE" not in literals, "the worker flag and prelude are harness's"
    assert not any(isinstance(n, ast.Attribute) and n.attr == "training_step" for n in ast.walk(tree)), \
        f"{script} wraps Trainer.training_step itself"


def naive_counts(input_ids, labels, attention_mask=None) -> tuple:
    "(real, trained), one token at a time: real is a mask's ones, or without one a row up to its last label."
    real = trained = 0
    for r, row in enumerate(labels.tolist()):
        trained += sum(1 for label in row if label != -100)
        if attention_mask is not None: real += sum(attention_mask[r].tolist())
        else: real += max((i + 1 for i, label in enumerate(row) if label != -100), default=0)
    return real, trained


def test_count_tokens_padded_batch():
    "Right padding (the mask's zeros), a prompt without labels: real counts prompt and answer, trained the answer."
    lengths, prompts, width = [9, 5, 12], [4, 2, 7], 12
    ids = torch.arange(3 * width).reshape(3, width) + 3
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, -100)
    for r, p in enumerate(prompts): labels[r, :p] = -100
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)
    assert harness.count_tokens(batch) == naive_counts(ids, labels, mask) == (26, 13)
    assert harness.count_tokens(batch | dict(attention_mask=mask.bool())) == (26, 13)  # qlora.py's mask is bool


def test_count_tokens_packed_rows():
    """Packed rows have no attention mask (position ids tell the examples apart): a row is real up to its last label,
    the padding after it is not, and neither is a row with no label at all; prompts inside the row are real."""
    ids = torch.arange(30).reshape(3, 10)
    labels = torch.full((3, 10), -100)
    labels[0, 2:4] = 1; labels[0, 6:8] = 1   # two examples (prompts 0-1 and 4-5), then 2 padding slots
    labels[1, 1:10] = 1                      # one example filling the row
    batch = dict(input_ids=ids, labels=labels, position_ids=torch.zeros_like(ids))
    assert harness.count_tokens(batch) == naive_counts(ids, labels) == (8 + 10 + 0, 4 + 9)


def test_worker_figures_and_errors(tmp_path):
    "run_worker runs `script --worker SPEC RESULT`: the figures worker_main wrote, or the error the worker printed."
    script = tmp_path/"work.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
                      "from harness import WORKER, worker_main\n"
                      "def work(spec):\n"
                      "    if spec.get('fail'): raise ValueError('no such model')\n"
                      "    return dict(twice=2 * spec['n'])\n"
                      "if sys.argv[1:2] == [WORKER]: worker_main(work)\n")
    ok = harness.run_worker(script, dict(n=21), tmp_path/"ok", timeout=60, threads=1)
    assert ok["twice"] == 42 and ok["process_s"] > 0 and Path(ok["log"]) == tmp_path/"ok.log", ok
    failed = harness.run_worker(script, dict(fail=True), tmp_path/"failed", timeout=60)
    assert failed["error"].startswith("exit 1; ValueError: no such model (log: "), failed
