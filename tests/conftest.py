"Shared pytest set-up: everything offline, a per-session cache for the tiny fixtures."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import json  # after the environment above: qlora_nb must import offline
import pytest
from qlora_nb.tiny import make_alpaca_records


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    "A writer of local Alpaca-format JSON files: `alpaca_file(n)` -> the path of `n` short synthetic records."
    def write(n: int):
        path = tmp_path_factory.mktemp("data")/"alpaca.json"
        path.write_text(json.dumps(make_alpaca_records(n, max_words=10)))
        return path
    return write
