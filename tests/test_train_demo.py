"""`qlora-nb demo --tiny` (the tiny offline demo) as a newcomer runs it: offline, a real process, and it must show learning. Several minutes on a
busy CPU (the base model is pretrained on first use), so it is marked slow and runs only with QLORA_NB_SLOW=1
(`QLORA_NB_SLOW=1 python -m pytest tests/test_train_demo.py`). A bad flag is checked quickly, always."""
import os

import pytest
from helpers import run_qlora_nb
from qlora_nb.demo import demo_problems  # the files and figures the demo must show, held once


def qlora_nb(*args, timeout=1800): return run_qlora_nb(*args, timeout=timeout)


def test_demo_rejects_unknown_flags(tmp_path):
    rc, _, err = qlora_nb("demo", "--output_dir", str(tmp_path/"d"), "--steps", "3", timeout=300)
    assert rc == 2 and "Unknown setting(s) for `qlora-nb demo`: --steps 3" in err
    assert not (tmp_path/"d").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QLORA_NB_SLOW"), reason="slow: set QLORA_NB_SLOW=1 to run the full demo")
def test_demo_shows_learning(tmp_path):
    out = tmp_path/"demo"
    rc, stdout, err = qlora_nb("demo", "--tiny", "--output_dir", str(out))
    assert rc == 0, err[-3000:]
    assert demo_problems(out, stdout) == []  # what CI checks after the README's demo command (scripts/check_demo.py)
