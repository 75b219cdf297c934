"""A chat template FILE with a Jinja syntax error (issue 29, cases 3 and 4): `qlora-nb train --chat_template FILE` and
`qlora-nb chat --chat_template FILE` stop before any model loads, with status 2 and one line that names the file, the
line and what is wrong, and write nothing. The real console script runs in a child process."""
import subprocess, sys
from pathlib import Path

import pytest
from helpers import ENV, ROOT, listing, tiny_flags
from qlora_nb.tiny import tiny_model_path

QLORA_NB = Path(sys.executable).parent/"qlora-nb"  # the console script pip installed beside this Python
BROKEN = {  # (file text, what the error says about it)
    "unclosed if": ("{% for m in messages %}\n{{ m['content'] }}\n{% if m['role'] == 'user' %}\n",
                    "has a syntax error at line 3: Unexpected end of template. Jinja was looking for the following "
                    "tags: 'elif' or 'else' or 'endif'"),
    "unknown filter": ("{% for m in messages %}\n{{ m['content'] | shout }}\n{% endfor %}\n",
                       "has a syntax error at line 2: No filter named 'shout'"),
}


def run_cli(*args, cwd) -> tuple:
    r = subprocess.run([str(QLORA_NB), *map(str, args)], cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, text=True,
                       capture_output=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def check_refused(status, out, err, template: Path, says: str):
    errors = [line for line in err.splitlines() if line.startswith("qlora-nb: error:")]
    assert status == 2 and len(errors) == 1, (status, err[-3000:])
    assert f"qlora-nb: error: The chat template {template} {says}" in errors[0], errors[0]
    assert "fix the file, or choose one with --chat_template NAME" in errors[0], errors[0]
    assert err.rstrip().endswith(errors[0])  # the last thing said: nothing ran after it
    assert "Traceback" not in err and "loading base model" not in out + err and "Loading weights" not in err, err


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_model_path()  # built once, before the runs: its minutes are not theirs


@pytest.mark.parametrize("case", BROKEN)
def test_train_refuses_the_file_before_loading(case, tiny_model, alpaca_file, tmp_path):
    template, out = tmp_path/"mine.jinja", tmp_path/"run"
    template.write_text(BROKEN[case][0])
    before = listing(tmp_path)
    status, stdout, err = run_cli("train", *tiny_flags(alpaca_file(8), out, "--chat_template", template), cwd=ROOT)
    check_refused(status, stdout, err, template, BROKEN[case][1])
    assert not out.exists() and listing(tmp_path) == before  # no output folder, nothing else written


@pytest.mark.parametrize("case", BROKEN)
def test_chat_refuses_the_file_before_loading(case, tiny_model, tmp_path):
    template = tmp_path/"mine.jinja"
    template.write_text(BROKEN[case][0])
    before = listing(tmp_path)
    status, stdout, err = run_cli("chat", "--model_name_or_path", tiny_model, "--chat_template", template, cwd=tmp_path)
    check_refused(status, stdout, err, template, BROKEN[case][1])
    assert stdout == "" and listing(tmp_path) == before
