"""`qlora-nb merge` as a user runs it: adapters trained by `qlora-nb train` on tiny bases (a pad token added, tied
embeddings, several shards), merged in a child process, the result loaded where peft cannot be imported and compared
with the 4-bit model and its adapter computed here; and every bad input, each refused with exit status 2."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from safetensors import safe_open
from safetensors.torch import save_file
from helpers import ENV, ROOT, run_python, run_qlora_nb, tiny_flags

from qlora_nb.merge import adapter_on_4bit, logit_tolerance, make_plan
from qlora_nb.tiny import tiny_model_path

torch.set_num_threads(1)
IDS = [[1, 17, 33, 96, 250, 511, 512, 4]]  # 512: the [PAD] row the run added


def train_run(data, out, base) -> Path:
    "A short `qlora-nb train` run of the tiny model `base` (a folder); its output folder."
    flags = tiny_flags(data, out, max_steps=6, save_steps=6, learning_rate=3e-2)
    flags[flags.index("--model_name_or_path") + 1] = str(base)
    status, _, err = run_qlora_nb("train", *flags)
    assert status == 0, err[-3000:]
    return Path(out)


def logits_without_peft(folder) -> torch.Tensor:
    "The logits of the model in `folder` on `IDS`, computed in a child process where `import peft` fails."
    code = f"""import sys; sys.modules['peft'] = None
import json, torch
from transformers import AutoModelForCausalLM
try: import peft; sys.exit('peft was importable')
except ImportError: pass
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)
print(json.dumps(m(input_ids=torch.tensor({IDS})).logits[0].tolist()))"""
    res = run_python("-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))


def logits_4bit_with_adapter(run, base) -> torch.Tensor:
    "The logits of the 4-bit base with the run's adapter (peft), loaded as training loads it, on `IDS`."
    adapter = Path(run)/"adapter_model"
    plan, _ = make_plan(adapter, Path(base))
    rows = plan.saved[plan.embeddings[0]].shape[0]
    with torch.no_grad(): return adapter_on_4bit(plan, adapter, Path(base), rows)(input_ids=torch.tensor(IDS)).logits[0].float()


def tied_sharded_base(folder) -> Path:
    "The pad-less tiny base with its head tied to its input embeddings, saved in shards of at most 40 kB."
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src = tiny_model_path(pad=None)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, tie_word_embeddings=True))
    weights = AutoModelForCausalLM.from_pretrained(src).state_dict()
    model.load_state_dict({k: v for k, v in weights.items() if k != "lm_head.weight"}, strict=False)
    model.save_pretrained(folder, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def runs(alpaca_file, tmp_path_factory):
    "{name: (run folder, base folder)}: a pad-less base, and a tied multi-shard one, each with a trained adapter."
    data, tmp = alpaca_file(24), tmp_path_factory.mktemp("merge")
    base = tiny_model_path(pad=None)
    tied = tied_sharded_base(tmp/"tied_base")
    return {"pad": (train_run(data, tmp/"run", base), base), "tied": (train_run(data, tmp/"tied_run", tied), tied),
            "tmp": tmp}


def test_merge_matches_the_4bit_model_with_its_adapter(runs, tmp_path):
    run, base = runs["pad"]
    status, out, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"merged", "--dtype", "fp32")
    assert status == 0, err[-3000:]
    assert "(b) merged model" in out and "merged" in out
    merged = tmp_path/"merged"
    report = json.loads((merged/"merge_report.json").read_text())
    models = report["models"]
    assert models["b"]["max_logit_diff"] <= report["tolerance"], report
    assert models["c"]["max_logit_diff"] > report["tolerance"], report  # the original weights: more than rounding
    config = json.loads((merged/"config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"]) == (513, 512)
    assert (merged/"tokenizer.json").is_file() and not list(tmp_path.glob(".*"))
    want = logits_4bit_with_adapter(run, base)  # computed here, with peft, independently of the report
    got = logits_without_peft(merged)
    err = float((got - want).abs().max())
    assert err <= logit_tolerance(torch.float32, float(want.abs().max())), err


def test_original_merge_is_off_by_the_quantization_error(runs, tmp_path):
    run, base = runs["pad"]
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"orig", "--into", "original",
                                  "--dtype", "fp32", "--no_report")
    assert status == 0, err[-3000:]
    assert not (tmp_path/"orig"/"merge_report.json").exists()
    adapter = Path(run)/"adapter_model"
    plan, _ = make_plan(adapter, Path(base))
    model = adapter_on_4bit(plan, adapter, Path(base), 513)  # (a): what the adapter was trained against
    layers = {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules()
              if hasattr(m, "get_delta_weight") and isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)}
    assert len(layers) == 14
    with safe_open(str(tmp_path/"orig"/"model.safetensors"), framework="pt") as merged, \
         safe_open(str(Path(base)/"model.safetensors"), framework="pt") as original:
        for name, m in layers.items():
            w4 = m.base_layer.weight
            dequantized = bnbF.dequantize_4bit(w4.data, w4.quant_state).double()
            delta = m.get_delta_weight("default").double()  # peft's delta
            quant_error = original.get_tensor(name).double() - dequantized  # in float64: exactly
            off = merged.get_tensor(name).double() - (dequantized + delta)
            # off by exactly the quantization error, but for the merge's float32 sum W + delta (one rounding, at most
            # 2**-24 of the result) and its float32 delta, which may round differently from peft's (2 * 2**-24 of it)
            rounding = 2 ** -24 * (merged.get_tensor(name).double().abs() + 2 * delta.abs())
            assert ((off - quant_error).abs() <= rounding).all(), name
            assert (quant_error.abs() > rounding).any(), name  # and the check can fail
    want = logits_4bit_with_adapter(run, base)
    got = float((logits_without_peft(tmp_path/"orig") - want).abs().max())
    assert got > logit_tolerance(torch.float32, float(want.abs().max())), got  # at the logits: more than rounding


def test_tied_multi_shard_base_bf16(runs, tmp_path):
    run, base = runs["tied"]
    n_shards = len(list(Path(base).glob("*.safetensors")))
    assert n_shards > 3
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"m", "--dtype", "bf16")
    assert status == 0, err[-3000:]
    merged = tmp_path/"m"
    index = json.loads((merged/"model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_shards == len(list(merged.glob("*.safetensors")))
    assert "lm_head.weight" not in index["weight_map"]  # still tied: peft saved the same matrix for both
    assert json.loads((merged/"config.json").read_text())["tie_word_embeddings"] is True
    report = json.loads((merged/"merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["models"]["b"]["max_logit_diff"] <= report["tolerance"], report
    want = logits_4bit_with_adapter(run, base)
    err = float((logits_without_peft(merged) - want).abs().max())
    assert logit_tolerance(torch.float32, float(want.abs().max())) < err <= report["tolerance"], err  # bfloat16 shows


def test_a_trained_head_is_never_replaced_by_the_embeddings(runs, tmp_path):
    run, base = runs["tied"]
    adapter = tmp_path/"adapter"
    shutil.copytree(Path(run)/"adapter_model", adapter)
    with safe_open(str(adapter/"adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 0.5  # trained apart
    save_file(tensors, str(adapter/"adapter_model.safetensors"), metadata={"format": "pt"})
    status, _, err = run_qlora_nb("merge", "--adapter", adapter, "--base", base, "--output_dir", tmp_path/"m",
                                  "--dtype", "fp32", "--no_report")
    assert status == 0, err[-3000:]
    assert "written untied" in err
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path/"m")
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, tensors["base_model.model.model.embed_tokens.weight"])


@pytest.mark.parametrize("case, message", [
    ("no_adapter", "no adapter_config.json there"),
    ("damaged_config", "adapter_config.json is not valid JSON"),
    ("damaged_weights", "is damaged or incomplete"),
    ("no_base", "is neither a local folder nor a hub model in reach"),
    ("other_base", "the base's weight is (64, 96)"),
    ("exists", "exists: pass --overwrite"),
    ("into_input", "would overwrite the merge's input"),
])
def test_bad_input_is_refused(runs, tmp_path, case, message):
    run, base = runs["pad"]
    adapter, out, more = Path(run), tmp_path/"out", []
    if case == "no_adapter": adapter = tmp_path
    if case.startswith("damaged"):
        adapter = tmp_path/"adapter"; shutil.copytree(Path(run)/"adapter_model", adapter)
        name = "adapter_config.json" if case == "damaged_config" else "adapter_model.safetensors"
        (adapter/name).write_bytes((adapter/name).read_bytes()[:100])
    if case == "no_base": more = ["--base", str(tmp_path/"nowhere")]
    if case == "other_base":
        from transformers import AutoConfig, AutoModelForCausalLM
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base, intermediate_size=96)).save_pretrained(tmp_path/"other")
        more = ["--base", str(tmp_path/"other")]
    if case == "exists": out.mkdir(); (out/"keep").write_text("mine")
    if case == "into_input": out = Path(run)
    status, _, err = run_qlora_nb("merge", "--adapter", adapter, "--output_dir", out, "--no_report", *more)
    assert status == 2, err[-3000:]
    assert "qlora-nb: error:" in err and message in err, err[-3000:]
    if case == "exists": assert (out/"keep").read_text() == "mine"
    elif case != "into_input": assert not out.exists()
    assert not list(tmp_path.glob(".out.incomplete"))


def test_an_interrupted_merge_leaves_no_folder_and_overwrite_replaces(runs, tmp_path):
    run, _ = runs["pad"]
    out = tmp_path/"out"
    stop = "import qlora_nb.merge as m\ndef stop(*a): raise KeyboardInterrupt\nm.publish_checkpoint = stop"
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", out, "--no_report", prelude=stop)
    assert status == 130, err[-3000:]
    assert f"merge interrupted before it finished: nothing was written to {out}" in err
    assert not out.exists() and not list(tmp_path.iterdir())  # the staging folder went with it
    (tmp_path/".out.incomplete").mkdir()  # what a SIGKILL leaves: removed by the next merge
    out.mkdir(); (out/"old").write_text("old")
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", out, "--no_report", "--overwrite")
    assert status == 0, err[-3000:]
    assert "was stopped before it finished" in err
    assert not (out/"old").exists() and (out/"config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Ctrl-C once the folder is in place: it is complete, and the user is told so
    late = ("import qlora_nb.merge as m\nreal = m.publish_checkpoint\n"
            "def late(*a): real(*a); raise KeyboardInterrupt\nm.publish_checkpoint = late")
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"late", "--no_report", prelude=late)
    assert status == 130 and f"interrupted after the merge had finished: {tmp_path/'late'} is complete" in err, err[-3000:]
    assert (tmp_path/"late"/"config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["late", "out"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    "(data file, run, merged folder, merge's stdout): a ChatML run on conversations, an eval split held out, merged."
    from qlora_nb.tiny import make_conversation_records
    tmp = tmp_path_factory.mktemp("chat")
    data = tmp/"chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_conversation_records(40, seed=1)))
    flags = tiny_flags(data, tmp/"run", "--chat_template", "chatml", "--do_eval", max_steps=6, save_steps=6,
                       learning_rate=3e-2)
    status, _, err = run_qlora_nb("train", *flags)
    assert status == 0, err[-3000:]
    status, out, err = run_qlora_nb("merge", "--adapter", tmp/"run", "--output_dir", tmp/"merged", "--dtype", "fp32",
                                    "--max_examples", "3")
    assert status == 0, err[-3000:]
    return data, tmp/"run", tmp/"merged", out


def chat_reply(merged, text: str, max_new_tokens: int) -> str:
    "The merged model's greedy reply to one user turn, computed here with plain transformers, up to the end of turn."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_report_scores_the_runs_eval_split_of_conversations(chat_run):
    data, run, merged, out = chat_run
    report = json.loads((merged/"merge_report.json").read_text())
    assert (report["source"], report["examples"]) == (f"the run's eval split of {data}", 3), report
    assert report["models"]["b"]["max_logit_diff"] <= report["tolerance"], report
    assert f"3 examples, the run's eval split of {data}" in out
    assert "<|im_start|>" in (merged/"chat_template.jinja").read_text()


def test_eval_data_of_conversations_and_a_data_set_that_is_gone(chat_run, runs, tmp_path):
    data, run, _, _ = chat_run
    status, out, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"m", "--eval_data", data,
                                    "--max_examples", "2")
    assert status == 0, err[-3000:]
    report = json.loads((tmp_path/"m"/"merge_report.json").read_text())
    assert (report["source"], report["examples"]) == (f"--eval_data {data}", 2), report
    moved = tmp_path/"moved"  # the run, with a recorded data set that is no longer anywhere
    shutil.copytree(run, moved)
    record = json.loads((moved/"metrics.json").read_text())
    record["config"]["data"]["dataset"] = "gone/chats.jsonl"
    (moved/"metrics.json").write_text(json.dumps(record))
    status, _, err = run_qlora_nb("merge", "--adapter", moved, "--output_dir", tmp_path/"m2", "--max_examples", "2")
    assert status == 0, err[-3000:]
    assert "the run's data set gone/chats.jsonl is not found" in err and "pass --eval_data FILE" in err, err[-3000:]
    assert json.loads((tmp_path/"m2"/"merge_report.json").read_text())["source"] == "fixed texts"
    pairs_run, _ = runs["pad"]  # its tokenizer has no chat template to score conversations with
    status, _, err = run_qlora_nb("merge", "--adapter", pairs_run, "--output_dir", tmp_path/"m3", "--eval_data", data)
    assert status == 2 and "the conversations need the run's chat template" in err, err[-3000:]
    assert not (tmp_path/"m3").exists()


def test_chat_takes_a_merged_folder_as_a_plain_model(chat_run):
    _, _, merged, _ = chat_run
    r = subprocess.run([sys.executable, "-m", "qlora_nb", "chat", "--model_name_or_path", str(merged), "--bits", "32",
                        "--max_new_tokens", "6"], input="hi\n", capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    banner = next(line for line in r.stderr.splitlines() if line.startswith("qlora-nb chat: "))
    assert str(merged) in banner and "<|im_end|>" in banner and "adapter" not in banner, banner
    assert r.stdout.startswith("model: ") and r.stdout.count("model: ") == 1, r.stdout
    assert r.stdout.removeprefix("model: ").strip() == chat_reply(merged, "hi", 6).strip(), r.stdout


def test_mmlu_takes_a_merged_folder_as_a_plain_model(runs, tmp_path):
    from qlora_nb.tiny import write_mmlu_files
    run, base = runs["pad"]
    status, _, err = run_qlora_nb("merge", "--adapter", run, "--output_dir", tmp_path/"merged", "--dtype", "fp32",
                                  "--no_report")
    assert status == 0, err[-3000:]
    mmlu = write_mmlu_files(tmp_path/"mmlu", n_per_subject=4)
    common = ["--mmlu_path", str(mmlu), "--max_mmlu_samples", "12"]
    status, _, err = run_qlora_nb("mmlu", "--model_name_or_path", tmp_path/"merged", "--bits", "32",
                                  "--output_dir", tmp_path/"plain", *common)
    assert status == 0, err[-3000:]
    status, _, err = run_qlora_nb("mmlu", "--model_name_or_path", base, "--adapter", run,
                                  "--output_dir", tmp_path/"peft", *common)  # the 4-bit base with its adapter
    assert status == 0, err[-3000:]
    merged, trained = (json.loads((tmp_path/d/"mmlu_eval.json").read_text()) for d in ("plain", "peft"))
    assert merged["predictions"] == trained["predictions"] and merged["accuracy"] == trained["accuracy"]
    assert len(merged["predictions"]) == 12
