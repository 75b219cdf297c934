"""`qlora-nb export` as a user runs it: a tiny Llama with a SentencePiece tokenizer (as LLaMA checkpoints ship it,
`tokenizer.model` included), trained on conversations in ChatML, exported to f16 and q8_0 in a child process, and the
files checked here with llama.cpp against an independent reference (the 4-bit base with its adapter, through peft);
every bad input refused with one line and exit status 2, leaving nothing in the output folder; and the real model
(SmolLM2-135M-Instruct) exported to f16, q8_0 and q4_k_m, its chat stopping at the end of the turn.

Skipped (with the reason) where llama-cpp-python or llama.cpp's converter is not installed, unless
QLORA_NB_EXPORT=required (as `.ci/run` sets it), which turns that skip into a failure. The real-model test is skipped
where the model cannot be fetched, unless QLORA_NB_REAL_MODEL=required."""
import json, os, shutil
from pathlib import Path

import pytest
import torch

from helpers import run_qlora_nb, tiny_flags
from qlora_nb.checks import ConfigError
from qlora_nb.tiny import make_conversation_records, make_tiny_model, train_sentencepiece

torch.set_num_threads(1)
WITH_EXPORT = ""  # `export` is in qlora_nb.cli's table: the child runs the CLI as a user does


def llama_cpp_ready():
    "Skip (or, under QLORA_NB_EXPORT=required, fail) where llama.cpp's bindings or converter are missing."
    from qlora_nb.export import converter_script, llama_cpp_module
    try: llama_cpp_module(); converter_script()
    except ConfigError as e:
        if os.environ.get("QLORA_NB_EXPORT") == "required": raise
        pytest.skip(f"llama.cpp is not installed here: {e}")


def export(*args, prelude: str = "", timeout: float = 900) -> tuple:
    "`qlora-nb export ARGS` in a child process: (exit status, stdout, stderr)."
    return run_qlora_nb("export", *args, prelude=WITH_EXPORT + "\n" + prelude, timeout=timeout)


def sentencepiece_base(folder: Path) -> Path:
    "The tiny Llama with Llama-2's tokenizer files: `tokenizer.model`, and a `tokenizer.json` that cuts text as it does."
    from transformers import AutoTokenizer
    make_tiny_model(folder, sentencepiece=True, pad=None)
    (folder/"tokenizer.model").write_bytes(train_sentencepiece(512, 0))  # the pieces make_tiny_model trained
    spec = json.loads((folder/"tokenizer.json").read_text())
    # Llama-2's tokenizer.json: "▁" before every piece of text, after a special token too (as sentencepiece and
    # llama.cpp do), where transformers 5 rebuilding one from tokenizer.model puts it at the very start only
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                          {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    (folder/"tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder/"tokenizer_config.json").read_text())
    (folder/"tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple:
    "(run folder, base folder): a short ChatML run of the tiny SentencePiece Llama on synthetic conversations."
    llama_cpp_ready()
    tmp = tmp_path_factory.mktemp("export")
    base, data = sentencepiece_base(tmp/"base"), tmp/"chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_conversation_records(60, seed=1)))
    flags = tiny_flags(data, tmp/"run", "--chat_template", "chatml", max_steps=6, save_steps=6, learning_rate=3e-2)
    flags[flags.index("--model_name_or_path") + 1] = str(base)
    status, _, err = run_qlora_nb("train", *flags, timeout=600)
    assert status == 0, err[-3000:]
    return tmp/"run", base


def gguf_logits(path: Path, ids: list):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    try: llm.eval(ids); return torch.tensor(np.array(llm.scores[:len(ids)]))
    finally: llm.close()


def reference_logits(run: Path, base: Path, ids: list) -> torch.Tensor:
    "The 4-bit base with the run's adapter (peft), as training computed it: an independent reference."
    from qlora_nb.merge import adapter_on_4bit, embedding_rows, make_plan
    plan, _ = make_plan(run/"adapter_model", base)
    model = adapter_on_4bit(plan, run/"adapter_model", base, embedding_rows(plan))
    with torch.no_grad(): return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_tiny_export_is_what_was_trained(tiny_run, tmp_path):
    from transformers import AutoTokenizer
    import llama_cpp
    from qlora_nb.merge import logit_tolerance
    run, base = tiny_run
    out = tmp_path/"gguf"
    status, stdout, err = export("--adapter", run, "--output_dir", out, "--quant", "f16,q8_0")
    assert status == 0, err[-3000:]
    assert "FAILED" not in stdout and "ok  f16: greedy continuations equal" in stdout, stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "export_report.json", "gguf-f16.gguf",
                                                     "gguf-q8_0.gguf"]
    assert not list(tmp_path.glob(".*")), "a staging folder was left behind"
    report = json.loads((out/"export_report.json").read_text())
    assert report["passed"] and [f["type"] for f in report["files"]] == ["f16", "q8_0"]
    f16, q8 = (out/"gguf-f16.gguf").stat().st_size, (out/"gguf-q8_0.gguf").stat().st_size
    assert q8 < 0.75 * f16, (q8, f16)  # 8.5 bits a weight against 16 (the tiny model's metadata weighs too)
    # independently of export's own checks: the f16 file's logits against the 4-bit model with its adapter
    tok = AutoTokenizer.from_pretrained(run)
    messages = [{"role": "user", "content": "What is the first letter of the word table?"},
                {"role": "assistant", "content": "The first letter of table is t."}]
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    ref, got = reference_logits(run, base, ids), gguf_logits(out/"gguf-f16.gguf", ids)
    # the 4-bit layer may round in bfloat16 (AVX512-BF16 CPUs), the file in float16: the looser of the two bounds
    tol = logit_tolerance(torch.bfloat16, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= tol, (float((got - ref).abs().max()), tol)
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # positions no rounding can swap
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    # the file carries the run's chat template, and llama.cpp ends a generation at its end-of-turn token
    llm = llama_cpp.Llama(str(out/"gguf-q8_0.gguf"), n_ctx=64, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == (run/"chat_template.jinja").read_text()
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok.convert_tokens_to_ids("<|im_end|>"))
    finally: llm.close()
    assert "FROM ./gguf-q8_0.gguf" in (out/"Modelfile").read_text()
    assert "PARAMETER stop \"<|im_end|>\"" in (out/"Modelfile").read_text()


def test_a_failed_check_fails_the_command_and_writes_nothing(tiny_run, tmp_path):
    run, _ = tiny_run
    impossible = ("import qlora_nb.export as e; "
                  "e.quant_checks = lambda kind, scores, size, f16_size: [(f'{kind}: an impossible bound', False, '')]")
    status, out, err = export("--adapter", run, "--output_dir", tmp_path/"gguf", "--quant", "q8_0", prelude=impossible)
    assert status == 2, err[-3000:]
    assert "qlora-nb: error: the exported files failed their checks: q8_0: an impossible bound" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == [], os.listdir(tmp_path)


def without_template(run: Path, dest: Path) -> Path:
    "A copy of the run whose saved tokenizer has no chat template."
    shutil.copytree(run, dest)
    (dest/"chat_template.jinja").unlink()
    config = json.loads((dest/"tokenizer_config.json").read_text()); config.pop("chat_template", None)
    (dest/"tokenizer_config.json").write_text(json.dumps(config))
    return dest


def quantized_base(base: Path, dest: Path) -> Path:
    "A copy of the base whose config says it is stored in 4 bits (as a pre-quantized checkpoint's does)."
    shutil.copytree(base, dest)
    config = json.loads((dest/"config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (dest/"config.json").write_text(json.dumps(config))
    return dest


def unknown_tokenizer(run: Path, dest: Path) -> Path:
    "A copy of the run with a byte-level BPE tokenizer trained here, whose pre-tokenizer llama.cpp does not know."
    from transformers import AutoTokenizer
    from qlora_nb.tiny import tiny_model_path
    shutil.copytree(run, dest)
    for f in ("tokenizer.json", "tokenizer_config.json"): (dest/f).unlink()
    tok = AutoTokenizer.from_pretrained(tiny_model_path(pad=None))
    tok.chat_template = (run/"chat_template.jinja").read_text()
    tok.save_pretrained(dest)
    return dest


BAD = {  # what is wrong -> (flags, a prelude for the child, what the one line says)
    "no adapter": (lambda run, base, tmp: ["--adapter", tmp/"nothing"], "", "no adapter_config.json there"),
    "an unknown type": (lambda run, base, tmp: ["--adapter", run, "--quant", "q3_k_xs"], "", "choose types among"),
    "no chat template": (lambda run, base, tmp: ["--adapter", without_template(run, tmp/"plain")], "",
                         "the run's tokenizer has no chat template"),
    "a 4-bit base": (lambda run, base, tmp: ["--adapter", run, "--base", quantized_base(base, tmp/"q")], "",
                     "is stored quantized"),
    "a tokenizer llama.cpp cannot convert": (lambda run, base, tmp: ["--adapter", unknown_tokenizer(run, tmp/"bpe")],
                                             "", "BPE pre-tokenizer was not recognized"),
    "too little disk": (lambda run, base, tmp: ["--adapter", run],
                        "import shutil, collections; U = collections.namedtuple('U', 'total used free'); "
                        "shutil.disk_usage = lambda p: U(10**9, 10**9 - 1000, 1000)", "GiB free: free space"),
    "no llama-cpp-python": (lambda run, base, tmp: ["--adapter", run], "import sys; sys.modules['llama_cpp'] = None",
                            "pip install -e \".[gguf]\""),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_write_nothing(tiny_run, tmp_path, case):
    run, base = tiny_run
    make_flags, prelude, message = BAD[case]
    inputs = tmp_path/"inputs"; inputs.mkdir()
    out = tmp_path/"gguf"
    status, stdout, err = export(*make_flags(run, base, inputs), "--output_dir", out, prelude=prelude, timeout=300)
    assert status == 2 and stdout == "", (status, stdout, err[-3000:])
    last = err.strip().splitlines()[-1]  # notes on the way (`qlora-nb: ...`) may come before it
    assert last.startswith("qlora-nb: error: ") and message in last and "Traceback" not in err, err[-3000:]
    assert len([l for l in err.splitlines() if l.startswith("qlora-nb: error:")]) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"], "the output folder or its staging was left"


# ---- the real model (the real-model tier) ----

@pytest.fixture(scope="module")
def smol() -> Path:
    "SmolLM2-135M-Instruct's folder (`qlora-nb get-model`), fetched the first time."
    from qlora_nb.sources import get_model
    llama_cpp_ready()
    try: return get_model("smollm2-135m-instruct")
    except ConfigError as e:
        if os.environ.get("QLORA_NB_REAL_MODEL") == "required": raise
        pytest.skip(f"the real model cannot be fetched here: {e}")


def test_smollm2_export_stops_at_the_end_of_the_turn(smol, tmp_path):
    data = tmp_path/"chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_conversation_records(24, seed=2)))
    flags = tiny_flags(data, tmp_path/"run", max_steps=2, save_steps=2, learning_rate=1e-4,
                       source_max_len=96, target_max_len=32)
    flags[flags.index("--model_name_or_path") + 1] = str(smol)
    status, _, err = run_qlora_nb("train", *flags, timeout=900)
    assert status == 0, err[-3000:]
    out = tmp_path/"gguf"
    status, stdout, err = export("--adapter", tmp_path/"run", "--output_dir", out, "--max_examples", "4",
                                 "--prompts", "3", timeout=1500)
    assert status == 0, err[-3000:]
    report = json.loads((out/"export_report.json").read_text())
    assert report["passed"] and [f["type"] for f in report["files"]] == ["f16", "q8_0", "q4_k_m"]
    assert all(g["match"] for g in report["greedy"]) and report["chat"]["gguf"]["finish_reason"] == "stop"
    sizes = {f["type"]: f["bytes"] for f in report["files"]}
    assert sizes["q4_k_m"] < sizes["q8_0"] < 0.6 * sizes["f16"], sizes
