"""Data pipeline benchmark: qlora.py's collator vs qlora_nb's pre-tokenized and packed pipelines.

    python bench/bench_data.py            # ~4000 synthetic Alpaca examples, the tiny tokenizer, CPU only

Prints, for one epoch through a DataLoader with transformers' LengthGroupedSampler:
  tokens/s   real (non-padding) tokens delivered to the model per second of data loading,
  padding    share of the batch slots that are padding (compute the model spends on nothing),
  prep s     one-time preparation (pre-tokenizing, packing; cached on disk by `datasets` for later runs),
for (a) qlora.py's pipeline re-created as it was (tokenizing strings inside the collator, grouping by characters),
(b) qlora_nb pre-tokenized with grouping by tokens, (c) qlora_nb with packing. It is a benchmark, not a test.
"""
import argparse, os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import datasets
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler

from qlora_nb.data import DataCollatorForCausalLM, pack_dataset, tokenize_dataset
from qlora_nb.formatters import format_dataset
from qlora_nb.tiny import make_alpaca_records, tiny_model_path

from qlora_py import IGNORE_INDEX, QloraPyCollator  # bench/qlora_py.py


def real_tokens(batch) -> tuple:
    "(real tokens, slots) of a batch; packed batches mark their padding as a segment of position ids at the end."
    if "position_ids" in batch:  # a packed row's padding: labels -100 after the row's true length
        n = batch["input_ids"].numel()
        pad = sum(int(row.shape[0] - last - 1) for row, last in
                  ((r, int(torch.nonzero(r != IGNORE_INDEX).max()) if (r != IGNORE_INDEX).any() else -1) for r in batch["labels"]))
        return n - pad, n
    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()


def run_epoch(dataset, lengths, collate, batch_size, seed=0) -> dict:
    "One epoch through a DataLoader with the length-grouped sampler; tokens/s and padding."
    sampler = LengthGroupedSampler(batch_size, lengths=list(lengths), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0)
    real = slots = 0
    start = time.perf_counter()
    for batch in loader:
        r, s = real_tokens(batch); real += r; slots += s
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, real=real, slots=slots, tokens_per_s=real / seconds, padding=1 - real / slots)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--batch_size", type=int, default=16, help="examples per batch for (a) and (b)")
    p.add_argument("--source_max_len", type=int, default=1024)
    p.add_argument("--target_max_len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline; the best is reported")
    a = p.parse_args(argv)
    datasets.disable_progress_bars(); datasets.disable_caching()  # time the preparation itself, not a cache hit
    torch.set_num_threads(1)

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    data = format_dataset(Dataset.from_list(make_alpaca_records(a.examples, seed=1)), "alpaca")
    n_tokens = [len(tok(r["input"] + r["output"]).input_ids) for r in data.select(range(200))]
    print(f"corpus: {len(data)} Alpaca-format examples, tokens per example (first 200): "
          f"min {min(n_tokens)}, median {sorted(n_tokens)[100]}, max {max(n_tokens)}; batch {a.batch_size}; CPU, 1 thread\n")

    results = {}
    # (a) qlora.py: text in the data set, `length` in characters, tokenized inside the collator on every batch
    chars = [len(i) + len(o) for i, o in zip(data["input"], data["output"])]
    qcoll = QloraPyCollator(tok, a.source_max_len, a.target_max_len)
    results["(a) qlora.py"] = (0.0, min((run_epoch(data, chars, qcoll, a.batch_size) for _ in range(a.repeats)), key=lambda r: r["seconds"]))

    # (b) ours: tokenized once, grouped by tokens
    ours = DataCollatorForCausalLM(tok, a.source_max_len, a.target_max_len)
    t = time.perf_counter(); tokd = tokenize_dataset(data, tok, a.source_max_len, a.target_max_len); prep_b = time.perf_counter() - t
    results["(b) pre-tokenized"] = (prep_b, min((run_epoch(tokd, tokd["length"], ours, a.batch_size) for _ in range(a.repeats)), key=lambda r: r["seconds"]))

    # (c) ours with packing: rows of source_max_len + target_max_len tokens, as many tokens per batch as (b) on average
    t = time.perf_counter(); rows = pack_dataset(tokd, a.source_max_len + a.target_max_len); prep_c = prep_b + time.perf_counter() - t
    row_batch = max(1, round(a.batch_size * sum(tokd["length"]) / len(tokd) / (a.source_max_len + a.target_max_len)))
    results[f"(c) packed ({row_batch} rows/batch)"] = (prep_c, min((run_epoch(rows, rows["length"], ours, row_batch) for _ in range(a.repeats)), key=lambda r: r["seconds"]))

    base = results["(a) qlora.py"][1]
    print(f"{'pipeline':28} {'tokens/s':>10} {'padding':>8} {'epoch s':>8} {'prep s':>7} {'x (a)':>6} {'x (a) incl. prep':>17}")
    for name, (prep, r) in results.items():
        with_prep = r["real"] / (r["seconds"] + prep)
        print(f"{name:28} {r['tokens_per_s']:10,.0f} {r['padding']:8.1%} {r['seconds']:8.2f} {prep:7.2f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:6.1f} {with_prep / base['tokens_per_s']:17.1f}")
    print("\ntokens/s counts real tokens only; 'x (a) incl. prep' charges the one-time preparation to a single epoch "
          "(later epochs and runs reuse it).")
    return results


if __name__ == "__main__":
    main()
