"""Labels placed by character offsets, where a chat template's assistant turn starts or ends inside a token of the
whole conversation (issue 24, item 5). The tokenizer is byte-level BPE with GPT-2's split pattern, trained here on text
with blank lines and indented code, so that it has learned `\\n\\n` and `\\n   ` as tokens. With Llama 3's template the
`\\n\\n` that ends a generation prompt is one token alone and two in front of a reply; with Qwen2.5's, a reply that
starts with white space (indented code) joins its spaces to the header's newline. The ids must be
`apply_chat_template`'s, and the labels are checked against a naive computation that uses neither the tokenizer's
offsets nor qlora_nb's spans: each token decoded on its own, placed by counting characters, and the assistant texts
found in the rendering by searching for them."""
import json

import pytest
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

import qlora_nb.templates as templates
from qlora_nb.checks import ConfigError
from qlora_nb.data import tokenize_conversation_dataset
from qlora_nb.templates import OFFSET_LABELLED, shipped_template, tokenize_conversation, use_chat_template
from qlora_nb.tiny import make_tiny_tokenizer, tiny_corpus, train_sentencepiece

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Qwen2.5-Instruct's chat template without its tools branch (the conversations here have no tools): a default system
# message, every message `<|im_start|>role\ncontent<|im_end|>\n`, the content as written (not trimmed).
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# name: (template, the end of an assistant turn, its content as the template writes it)
TEMPLATES = {"llama-3": (shipped_template("llama-3"), "<|eot_id|>", str.strip),
             "qwen2.5": (QWEN25, "<|im_end|>", str), "chatml": (shipped_template("chatml"), "<|im_end|>", str)}

CHAT = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And the largest of 4 and 9?"},
        {"role": "assistant", "content": "The largest is 9."}]
SYSTEM = [{"role": "system", "content": "You answer arithmetic questions."}]
CODE = [{"role": "user", "content": "Write the body of f."}, {"role": "assistant", "content": "    return 2 + 3"},
        {"role": "user", "content": "And of g?"}, {"role": "assistant", "content": "def g(x):\n    return x + 9"}]


def gpt2_split_bpe() -> PreTrainedTokenizerFast:
    "A byte-level BPE tokenizer splitting text with GPT-2's pattern, trained on the tiny corpus, blank lines and code."
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    extra = [f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300)] + ["The answer is\n\n"] * 300
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus() + extra, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe():
    return gpt2_split_bpe()


@pytest.fixture(autouse=True)
def fresh_run():
    OFFSET_LABELLED.clear()  # each test is a run of its own: the notice not said yet


def with_template(tok, name: str):
    "A copy of `tok` given the template `name` as a run gives it: its special tokens added, the end of a turn found."
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
                                  **tok.special_tokens_map)
    use_chat_template(tok, None, TEMPLATES[name][0])
    return tok


def naive_labels(tok, ids: list, full: str, messages: list, name: str) -> list:
    "The ids of the tokens whose characters all lie in an assistant text (its content as written and end marker)."
    pieces = [tok.decode([i]) for i in ids]  # ASCII text: each token decodes to exactly its own characters
    assert "".join(pieces) == full
    _, end, written = TEMPLATES[name]
    spans, cursor = [], 0
    for text in (written(m["content"]) + end for m in messages if m["role"] == "assistant"):
        cursor = full.index(text, cursor); spans.append((cursor, cursor + len(text))); cursor += len(text)
    starts = [sum(map(len, pieces[:k])) for k in range(len(pieces))]
    return [i if any(s <= a and a + len(p) <= e for s, e in spans) else -100 for i, p, a in zip(ids, pieces, starts)]


def check_row(tok, messages: list, name: str) -> dict:
    "The row of `messages`: its ids `apply_chat_template`'s, its labels the naive ones."
    row = tokenize_conversation(tok, messages)
    assert row["input_ids"] == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert row["labels"] == naive_labels(tok, row["input_ids"], full, messages, name)
    return row


def labelled_text(tok, row: dict) -> str:
    return "".join(tok.decode([i]) for i in row["labels"] if i != -100)


def test_the_tokenizer_splits_as_gpt2_does(bpe):
    # the cause: a run of newlines is one token when nothing follows it, and gives its last newline to what follows
    assert bpe.tokenize("The answer is\n\n")[-1] == "ĊĊ" and bpe.tokenize("\n\n2") == ["Ċ", "Ċ", "2"]
    assert bpe.tokenize("\n    return")[:2] == ["ĊĠĠĠ", "Ġreturn"] and bpe.tokenize("\n")[-1] == "Ċ"


@pytest.mark.parametrize("messages", [CHAT, SYSTEM + CHAT], ids=["no system", "system"])
def test_llama3_is_labelled_by_offsets(bpe, messages, capsys):
    tok = with_template(bpe, "llama-3")
    row = check_row(tok, messages, "llama-3")
    assert labelled_text(tok, row) == "2 plus 3 is 5.<|eot_id|>The largest is 9.<|eot_id|>"  # no token straddles
    err = capsys.readouterr().err
    assert err.count("labels by character offsets: an assistant turn starts or ends inside a token") == 1, err
    assert "<|end_header_id|>\\n\\n' | '" in err  # where: after the generation prompt's \n\n


@pytest.mark.parametrize("name", ["qwen2.5", "chatml"])
def test_qwen25_reply_that_starts_with_spaces(bpe, name, capsys):
    tok = with_template(bpe, name)
    check_row(tok, SYSTEM + CHAT, name)  # plain replies start a token: the exact labels, and nothing said
    assert "labels by character offsets" not in capsys.readouterr().err
    row = check_row(tok, CODE, name)
    # "\n   " is half header, half reply: not trained; the reply's fourth space starts " return"
    assert labelled_text(tok, row) == " return 2 + 3<|im_end|>def g(x):\n    return x + 9<|im_end|>"
    assert "labels by character offsets" in capsys.readouterr().err


def test_the_notice_is_said_once_a_run(bpe, capsys):
    tok = with_template(bpe, "llama-3")
    capsys.readouterr()
    OFFSET_LABELLED.clear()  # use_chat_template's probe conversation needed the offsets too: start the count here
    data = Dataset.from_list([{"conversation": json.dumps(CHAT if k % 2 else SYSTEM + CHAT)} for k in range(30)])
    rows = tokenize_conversation_dataset(data, tok, max_len=512)
    assert len(rows) == 30 and all(any(l != -100 for l in r) for r in rows["labels"])
    lines = [l for l in capsys.readouterr().err.splitlines() if "labels by character offsets" in l]
    assert len(lines) == 1, lines


def test_the_exact_labels_stay_the_default(monkeypatch):
    # where every boundary falls between tokens, the offsets are never asked for
    def refuse(*a, **k): raise AssertionError("offset labels used where the exact ones work")
    monkeypatch.setattr(templates, "offset_labels", refuse)
    tok = with_template(make_tiny_tokenizer(), "llama-3")
    for name in ("llama-3", "chatml"):
        tok = with_template(make_tiny_tokenizer(), name)
        check_row(tok, SYSTEM + CHAT, name)


def test_a_slow_tokenizer_is_refused_in_one_line(tmp_path):
    (tmp_path/"tokenizer.model").write_bytes(train_sentencepiece())
    slow = SentencePieceBackend(vocab_file=str(tmp_path/"tokenizer.model"), unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>")
    assert not slow.is_fast
    slow.chat_template = ("{% for m in messages %}{{ 'Q: ' if m.role == 'user' else 'A: ' }}{{ m.content }}\n"
                          "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    assert slow.tokenize("A: ")[-1] == "▁" and slow.tokenize("A: the")[-1] == "▁the"  # a reply starts in a token
    with pytest.raises(ConfigError) as e:
        tokenize_conversation(slow, [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "the sum"}])
    message = str(e.value)
    assert "\n" not in message and "need a fast tokenizer (a tokenizer.json)" in message, message
    assert "SentencePieceBackend is a slow one" in message and "A: ' | 'the sum" in message, message
