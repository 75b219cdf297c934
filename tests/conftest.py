"""Shared pytest set-up: everything offline (helpers.py sets the environment before qlora_nb is imported) and the
fixtures. The helpers the test modules call are in helpers.py, imported as a module."""
import json

import pytest
import helpers  # first: the offline environment
from qlora_nb.tiny import make_alpaca_records


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    "A writer of local Alpaca-format JSON files: `alpaca_file(n)` -> the path of `n` short synthetic records."
    def write(n: int, **kwargs):
        path = tmp_path_factory.mktemp("data")/"alpaca.json"
        path.write_text(json.dumps(make_alpaca_records(n, **{"max_words": 10, **kwargs})))
        return path
    return write
