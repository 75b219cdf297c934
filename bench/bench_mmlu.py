"""MMLU scoring: qlora.py's method against qlora_nb.mmlu.evaluate_mmlu, on the same model and questions.

    .venv/bin/python bench/bench_mmlu.py [--questions_per_subject 100] [--batch_size 8] [--vocab_size 32000] [--device cpu|cuda]

qlora.py's callback: the trainer's collator builds source + answer + EOS with labels, `Trainer.prediction_step`
returns the logits of every position over the whole vocabulary (`[batch, sequence, vocabulary]`, plus the LM loss
over them), and four numbers are read at the position before the first label. Ours (`evaluate_mmlu`): the
transformer body on the batch, the LM head on one position per row, questions sorted by length.

The model is a Llama of the tiny fixture's shape (width 64, 2 layers) with random weights and a realistic
32,000-token vocabulary, the tokenizer the tiny fixture's (its 512 ids are a subset of the model's 32,000). The
questions are `qlora_nb.tiny`'s synthetic five-shot MMLU prompts (qlora.py's file layout), three subjects.

Memory, on the CPU: each method runs in a fresh process; the figure is that process's resident-set high-water
mark (getrusage ru_maxrss, kept by the kernel, so no short peak is missed) minus its resident set just before
the evaluation starts (model loaded, questions read): the memory the evaluation really took from the system,
allocator caching included (tracemalloc cannot see torch's CPU tensors). If the evaluation never rises above the
process's earlier high-water mark (from loading), the figure is reported as an upper bound ("<="). On CUDA:
torch.cuda.max_memory_allocated during the evaluation minus the memory allocated before it.
Time: wall (time.perf_counter) and CPU time of the process (getrusage, user + system, all threads) around the
evaluation only: tokenizing and batching included, model loading not. On a machine shared with other work the
wall time varies from run to run; the CPU time much less.
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing qlora_nb


def build_model(folder, vocab_size):
    "A random-weight Llama with the tiny fixture's shape and `vocab_size` outputs, saved with the tiny tokenizer."
    from transformers import LlamaConfig, LlamaForCausalLM
    from qlora_nb.tiny import make_tiny_tokenizer
    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def qlora_collate(tokenizer, source_max_len=2048, target_max_len=256):
    "qlora.py's DataCollatorForCausalLM (train_on_source=False, predict_with_generate=False), as written there."
    from torch.nn.utils.rnn import pad_sequence
    def collate(instances):
        sources = [f"{tokenizer.bos_token}{ex['input']}" for ex in instances]
        targets = [f"{ex['output']}{tokenizer.eos_token}" for ex in instances]
        src = tokenizer(sources, max_length=source_max_len, truncation=True, add_special_tokens=False)
        tgt = tokenizer(targets, max_length=target_max_len, truncation=True, add_special_tokens=False)
        input_ids, labels = [], []
        for s, t in zip(src["input_ids"], tgt["input_ids"]):
            input_ids.append(torch.tensor(s + t))
            labels.append(torch.tensor([-100] * len(s) + t))
        input_ids = pad_sequence(input_ids, batch_first=True, padding_value=tokenizer.pad_token_id)
        labels = pad_sequence(labels, batch_first=True, padding_value=-100)
        return dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(tokenizer.pad_token_id))
    return collate


def qlora_method(model, tokenizer, records, batch_size, device):
    "qlora.py's MMLUEvalCallback loop: prediction_step over the eval dataloader, then index the full logits."
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=batch_size, report_to="none",
                             remove_unused_columns=False, use_cpu=device == "cpu", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, data_collator=qlora_collate(tokenizer))
    abcd_idx = [tokenizer(l, add_special_tokens=False).input_ids[0] for l in "ABCD"]

    def run():
        rows, loss_mmlu = [], 0.0
        loader = trainer.get_eval_dataloader(records)
        trainer.model.eval()
        for batch in loader:
            loss, logits, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
            for i, logit in enumerate(logits):
                label_non_zero_id = (batch["labels"][i] != -100).nonzero()[0][0]
                rows.append(logit[label_non_zero_id - 1][abcd_idx].float().cpu())
            loss_mmlu += loss.item()
        return torch.stack(rows)
    return run


def ours_method(model, tokenizer, records, batch_size, device):
    from qlora_nb.data import encode_sources
    from qlora_nb.mmlu import answer_token_ids, score_mmlu
    def run():
        prompts = encode_sources(tokenizer, [r["input"] for r in records], 2048)
        return score_mmlu(model, prompts, answer_token_ids(tokenizer), batch_size)
    return run


def cpu_seconds():
    "User + system CPU time of this process, all threads: less disturbed than wall time on a shared machine."
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(method, folder, n_per_subject, batch_size, device):
    "Run one method in this (fresh) process; print its figures as JSON."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qlora_nb.tiny import make_mmlu_records
    from qlora_nb.mmlu import mmlu_results
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    records = make_mmlu_records(n_per_subject, shots=5, seed=1)
    run = {"qlora": qlora_method, "ours": ours_method}[method](model, tokenizer, records, batch_size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda": torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    rss_before = psutil.Process().memory_info().rss
    hw_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sync(); t0, c0 = time.perf_counter(), cpu_seconds()
    logits = run()
    sync(); seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    hw_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda": peak, bound = torch.cuda.max_memory_allocated() - before, False
    else: peak, bound = max(hw_after, hw_before) - rss_before, hw_after <= hw_before
    res = mmlu_results(logits, records)
    print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu, peak_bytes=peak, upper_bound=bound, predictions=res["predictions"],
                          logits=logits.tolist(), accuracy=res["accuracy"])))


def measure(method, folder, args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder), "--questions_per_subject",
           str(args.questions_per_subject), "--batch_size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode: sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions_per_subject", type=int, default=100, help="three subjects: 300 questions by default")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on a shared machine, threads that wait for each other make timings erratic")
    p.add_argument("--child"); p.add_argument("--folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child: return child(args.child, args.folder, args.questions_per_subject, args.batch_size, args.device)

    with tempfile.TemporaryDirectory() as tmp: compare(Path(tmp)/"llama-vocab", args)


def compare(folder, args):
    from transformers import AutoTokenizer
    from qlora_nb.tiny import make_mmlu_records
    build_model(folder, args.vocab_size)
    tok = AutoTokenizer.from_pretrained(folder)
    records = make_mmlu_records(args.questions_per_subject, shots=5, seed=1)
    lengths = [len(tok(r["input"]).input_ids) for r in records]
    print(f"{len(records)} five-shot questions, prompt length mean {sum(lengths)/len(lengths):.0f} tokens "
          f"(min {min(lengths)}, max {max(lengths)}), vocabulary {args.vocab_size}, batch size {args.batch_size}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")

    qlora, ours = measure("qlora", folder, args), measure("ours", folder, args)
    mb = lambda r: f"{'<=' if r['upper_bound'] else ''}{r['peak_bytes'] / 2**20:.1f} MB"
    print(f"{'method':<42}{'wall time':>10}{'CPU time':>10}{'peak memory':>14}")
    for name, r in [("qlora.py: prediction_step, full logits", qlora), ("qlora_nb: evaluate_mmlu's scoring", ours)]:
        print(f"{name:<42}{r['seconds']:>9.2f}s{r['cpu_seconds']:>9.2f}s{mb(r):>14}")
    same = [a == b for a, b in zip(qlora["predictions"], ours["predictions"])]
    diff = (torch.tensor(qlora["logits"]) - torch.tensor(ours["logits"])).abs().max().item()
    print(f"speed-up {qlora['seconds'] / ours['seconds']:.1f}x wall time, {qlora['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU time; peak memory "
          f"{'>=' if ours['upper_bound'] else ''}{qlora['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}x less")
    print(f"predictions agree on {sum(same)}/{len(same)} questions; largest logit difference {diff:.2e}; "
          f"accuracy {qlora['accuracy']:.4f} vs {ours['accuracy']:.4f}")
    if not all(same): sys.exit("predictions differ")


if __name__ == "__main__":
    main()
