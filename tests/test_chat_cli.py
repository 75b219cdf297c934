"""`qlora-nb chat` as a user runs it: lines piped in get streamed replies, Ctrl-C ends it with status 130, and mistakes
are one `qlora-nb: error: ...` line with status 2, never a traceback."""
import signal, subprocess, sys, time

import pytest
from helpers import CTRL_C_REACHES, ENV, ROOT, run_qlora_nb, start_qlora_nb
from qlora_nb.tiny import tiny_model_path

FAST = ["--max_new_tokens", "8"]  # the tiny model, a few tokens a reply: seconds, most of them imports


def chat_flags(*more) -> list:
    return ["chat", "--model_name_or_path", str(tiny_model_path()), *FAST, *more]


def test_piped_lines_get_one_reply_each():
    # a real pipe: stdin is not a terminal, so no prompt is shown, and the chat ends with the input
    flags = chat_flags("--chat_template", "chatml", "--system", "Be brief.")
    r = subprocess.run([sys.executable, "-m", "qlora_nb", *flags], input="the sum\n/reset\nand the largest?\n",
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("model: ") and r.stdout.count("model: ") == 2, r.stdout  # stdout: the replies only
    assert r.stdout.endswith("\n") and "you: " not in r.stdout  # the prompt is for terminals
    assert "<|im_end|>" not in r.stdout  # the end-of-turn token stops a reply; it is not printed
    banner = next(line for line in r.stderr.splitlines() if line.startswith("qlora-nb chat: "))
    assert "the shipped chatml chat template" in banner and "<|im_end|>" in banner, banner
    assert "(a new conversation)" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_ctrl_c_exits_130():
    # SIGINT given back to the child (conftest.CTRL_C_REACHES): a CI shell in the background starts it ignored
    proc = start_qlora_nb(*chat_flags("--chat_template", "chatml"), prelude=CTRL_C_REACHES, stdin=subprocess.PIPE)
    try:
        seen, end = [], time.time() + 240
        while not any(line.startswith("qlora-nb chat:") for line in seen):  # loaded: now waiting for a line
            assert time.time() < end and proc.poll() is None, "".join(seen)[-3000:]
            seen.append(proc.stderr.readline())
        time.sleep(2)  # let it reach its read of stdin, on a loaded machine too
        proc.send_signal(signal.SIGINT)
        try: out, err = proc.communicate(timeout=180)  # stdin stays open: the input does not end, only Ctrl-C does
        except subprocess.TimeoutExpired:
            proc.kill(); out, err = proc.communicate()
            raise AssertionError(f"Ctrl-C did not end the chat in 180 s:\n{''.join(seen)[-2000:]}\n{err[-2000:]}")
    finally:
        if proc.poll() is None: proc.kill(); proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().endswith("qlora-nb: interrupted.") and "Traceback" not in err, err


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "{tmp}"], "qlora-nb: error: --adapter {tmp}: no adapter_config.json there"),
    ([], "no chat template of its own: choose one with --chat_template NAME"),  # the tiny tokenizer has none
])
def test_mistakes_are_one_line(tmp_path, flags, message):
    flags = [f.format(tmp=tmp_path) for f in flags]
    status, out, err = run_qlora_nb(*chat_flags(*flags), timeout=300)
    assert (status, out) == (2, ""), (status, out, err[-3000:])
    assert err.startswith("qlora-nb: error: ") and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err
