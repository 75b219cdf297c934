"""`qlora-nb train` on a file of conversations, as a researcher runs it: the loss falls, every saved tokenizer carries
the chat template, predictions are written for conversations, and a resumed run keeps its template."""
import json

import pytest
from transformers import AutoTokenizer

from helpers import run_qlora_nb, tiny_flags
from qlora_nb.tiny import make_conversation_records

CONVERSATION_RUN = dict(max_steps=24, save_steps=12, learning_rate=3e-3, source_max_len=96, target_max_len=64)


@pytest.fixture(scope="module")
def base():
    "The demo's pretrained tiny base (cached; a minute to build the first time): it knows the words, not the chats."
    from qlora_nb.demo import pretrained_base
    return pretrained_base()


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    "A JSON-lines file of 120 synthetic conversations in the `messages` format."
    path = tmp_path_factory.mktemp("data")/"chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_conversation_records(120, seed=1)))
    return path


def losses(out) -> list:
    "The logged training losses of the run in `out`, in step order."
    state = json.loads((out/"trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_train_on_conversations(chats, base, tmp_path):
    out = tmp_path/"run"
    code, _, err = run_qlora_nb("train", *tiny_flags(chats, out, "--chat_template", "chatml", "--do_predict",
                                                     "--model_name_or_path", base, **CONVERSATION_RUN))
    assert code == 0, err[-3000:]
    assert "using the shipped chatml chat template" in err and "<|im_start|>" in err  # the tokens it added, named
    curve = losses(out)
    print(curve)
    assert max(curve[-4:]) < min(curve[:4]), curve  # it learned: every late loss below every early one
    template = (out/"chat_template.jinja").read_text()
    for folder in (out, out/"checkpoint-12"):  # every tokenizer the run saved formats prompts as training did
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == template and "<|im_end|>" in tokenizer.get_vocab()
    predictions = [json.loads(line) for line in (out/"predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(isinstance(p["prediction"], str) for p in predictions)
    assert all(p["conversation"][-1]["role"] == "user" for p in predictions)  # the prompt ends where the reply starts


def test_resume_keeps_the_template(chats, tmp_path):
    out = tmp_path/"run"
    code, _, err = run_qlora_nb("train", *tiny_flags(chats, out, "--chat_template", "chatml", max_steps=2, save_steps=2))
    assert code == 0, err[-3000:]
    (out/"completed").unlink()  # as if stopped after its last checkpoint, then asked for more steps
    code, _, err = run_qlora_nb("train", *tiny_flags(chats, out, "--chat_template", "zephyr", max_steps=4, save_steps=2))
    assert code == 2 and "--chat_template chatml" in err and "Traceback" not in err, err[-3000:]


def test_conversations_without_a_template(chats, tmp_path):
    code, _, err = run_qlora_nb("train", *tiny_flags(chats, tmp_path/"run"))
    assert code == 2 and "--chat_template" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path/"run").exists() or not any((tmp_path/"run").iterdir())
