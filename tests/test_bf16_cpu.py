"""bfloat16 on the CPU end to end, as a user runs it: `qlora-nb train --bf16 --use_cpu` on the tiny model trains, evaluates,
scores MMLU during training, generates predictions and saves a bf16 adapter; `qlora-nb mmlu --bf16` and `qlora-nb merge`
take the run. `--fp16` on a CPU is refused in one line, exit 2, before any model loads. (Speed is a benchmark's
business: bench/bench_train.py, bench/bench_bf16_loss.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import listing, run_qlora_nb, tiny_flags
from qlora_nb.tiny import tiny_model_path, write_mmlu_files


@pytest.fixture(scope="module")
def bf16_run(alpaca_file, tmp_path_factory):
    "A completed `--bf16 --use_cpu` run with evaluation, MMLU during training and prediction; (run folder, MMLU folder)."
    work = tmp_path_factory.mktemp("bf16")
    mmlu = write_mmlu_files(work/"mmlu", n_per_subject=4)
    out = work/"run"
    rc, _, err = run_qlora_nb("train", *tiny_flags(alpaca_file(60), out, "--use_cpu", "--bf16", "--do_eval",
                                                   "--do_predict", "--do_mmlu_eval", "--mmlu_path", mmlu), timeout=900)
    assert rc == 0, err[-3000:]
    return out, mmlu


def test_bf16_train_eval_mmlu_predict(bf16_run):
    out, _ = bf16_run
    metrics = json.loads((out/"metrics.json").read_text())["metrics"]
    for key in ("train_loss", "eval_loss", "mmlu_eval_accuracy"): assert key in metrics, sorted(metrics)
    assert all(map(lambda k: metrics[k] == metrics[k], ("train_loss", "eval_loss")))  # not NaN
    assert len((out/"predictions.jsonl").read_text().splitlines()) > 0
    weights = load_file(out/"adapter_model"/"adapter_model.safetensors")
    lora_b = [w for n, w in weights.items() if "lora_B" in n]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)  # trained: B started at zero


def test_bf16_mmlu_and_merge_take_the_run(bf16_run, tmp_path):
    out, mmlu = bf16_run
    rc, _, err = run_qlora_nb("mmlu", "--model_name_or_path", tiny_model_path(), "--adapter", out, "--mmlu_path", mmlu,
                              "--bf16", "--use_cpu", "--output_dir", tmp_path/"mmlu", "--max_mmlu_samples", 8)
    assert rc == 0, err[-3000:]
    rc, _, err = run_qlora_nb("merge", "--adapter", out, "--output_dir", tmp_path/"merged", "--max_examples", 2)
    assert rc == 0, err[-3000:]
    assert (tmp_path/"merged"/"config.json").exists()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="float16 is allowed where a GPU trains")
def test_fp16_refused_on_cpu(alpaca_file, tmp_path):
    before = listing(tmp_path)
    rc, out, err = run_qlora_nb("train", *tiny_flags(alpaca_file(8), tmp_path/"run", "--fp16"))
    assert rc == 2 and "Traceback" not in err and "loading base model" not in out + err, err
    assert "--fp16 on a CPU" in err and "slower than in float32" in err and len(err.strip().splitlines()) == 1, err
    assert listing(tmp_path) == before
