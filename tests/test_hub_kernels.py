"""No code fetched at import: with the hub reachable (HF_HUB_OFFLINE unset, HF_ENDPOINT at a port of this test's own),
importing qlora_nb and then bitsandbytes, by any route, and a real `qlora-nb train`, open no connection and print
nothing; with QLORA_NB_HUB_KERNELS=1 bitsandbytes does ask (the control that shows the test can fail). bitsandbytes asks
only on CPUs with AVX512-BF16: the parts that need its request are skipped elsewhere, with the reason."""
import json, os, socket, subprocess, sys, threading
from pathlib import Path

import pytest
from bitsandbytes.functional import has_avx512bf16
from helpers import ENV, ROOT, run_python, tiny_flags
from qlora_nb.tiny import make_alpaca_records

AVX512_BF16 = has_avx512bf16()
asks_on_this_cpu = pytest.mark.skipif(not AVX512_BF16, reason="bitsandbytes asks the hub for a CPU kernel only on CPUs "
                                      "with AVX512-BF16, and this one has none: there is no request to prevent or see")
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")  # conftest sets the first two: not here


class Hub:
    "A stand-in for the model hub on 127.0.0.1: counts the connections it gets, and closes each unanswered."
    def __init__(self):
        self.server, self.connections = socket.create_server(("127.0.0.1", 0)), 0
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self):
        while True:
            try: connection, _ = self.server.accept()
            except OSError: return  # closed
            self.connections += 1
            connection.close()

    def env(self, **more) -> dict:
        "A child's environment: online (nothing offline), the hub at this port, no opt-in unless `more` sets it."
        keep = {k: v for k, v in ENV.items() if k not in OFFLINE and k != "QLORA_NB_HUB_KERNELS"}
        return keep | {"HF_ENDPOINT": f"http://127.0.0.1:{self.server.getsockname()[1]}"} | more


@pytest.fixture
def hub():
    hub = Hub()
    yield hub
    hub.server.close()


def python(code: str, env: dict) -> subprocess.CompletedProcess: return run_python("-c", code, env=env)


BNB_LOADED = "\nassert 'bitsandbytes.backends.cpu.ops' in sys.modules"  # the route did import bitsandbytes' CPU code

@pytest.mark.parametrize("route", ["import bitsandbytes",  # directly
                                   "import kernels, bitsandbytes",  # `kernels` loaded already (transformers may)
                                   "import peft"])  # through a library that imports bitsandbytes itself
def test_importing_asks_no_hub_and_prints_nothing(hub, route):
    r = python(f"import sys, qlora_nb\n{route}{BNB_LOADED}", hub.env())
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert hub.connections == 0


@asks_on_this_cpu
def test_opting_in_lets_bitsandbytes_ask_the_hub(hub):  # the control: the same child reaches the hub when allowed
    r = python(f"import sys, qlora_nb\nimport bitsandbytes{BNB_LOADED}", hub.env(QLORA_NB_HUB_KERNELS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert hub.connections > 0 or "kernels-community" in r.stderr, r.stderr[-3000:]


# bitsandbytes' Apple GPU backend asks lazily, at its first 4-bit op, on macOS 26 and later: here, pretend to be one
ON_MACOS_26 = """import platform; platform.mac_ver = lambda: ("26.0", ("", "", ""), "arm64")
import sys, qlora_nb
import bitsandbytes.backends.mps.ops as mps
print(mps._get_kernel())
"""

def test_the_lazy_apple_gpu_request_is_refused_unless_allowed(hub):
    r = python(ON_MACOS_26, hub.env())
    assert (r.returncode, r.stdout, r.stderr) == (0, "None\n", ""), r.stderr[-3000:]
    assert hub.connections == 0
    r = python(ON_MACOS_26, hub.env(QLORA_NB_HUB_KERNELS="1"))  # the control: allowed, it asks
    assert r.returncode == 0 and hub.connections > 0, r.stderr[-3000:]


def test_a_real_run_asks_no_hub_and_records_its_kernels(hub, tmp_path):
    data = tmp_path/"alpaca.json"
    data.write_text(json.dumps(make_alpaca_records(16, max_words=8)))
    flags = tiny_flags(data, tmp_path/"run", max_steps=1, save_steps=1, do_eval="false", do_predict="false")
    r = run_python("-m", "qlora_nb", "train", *flags, env=hub.env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hub.connections == 0 and "kernels-community" not in r.stderr, r.stderr[-3000:]
    record = json.loads((tmp_path/"run"/"metrics.json").read_text())
    assert record["cpu_kernels"]["4bit"] == ("bitsandbytes-avx512bf16" if AVX512_BF16 else "dequantize"), record
    assert record["cpu_kernels"]["torch"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256"), record


# A stand-in for the hub, inside the child: the real `kernels` package with `get_kernel` replaced by one that records
# each request and returns a kernel, as the hub would online. With it the hub path runs here for real, and what qlora_nb
# names it can be checked.
STAND_IN = """import os, kernels
def get_kernel(repo_id, version=None, **kwargs):
    with open(os.environ["KERNELS_REQUESTS"], "a") as f: f.write(repo_id + "\\n")
    class Kernel:
        @staticmethod
        def gemm_4bit_forward(*args): raise RuntimeError("the stand-in computes nothing")
    return Kernel
kernels.get_kernel = get_kernel
"""

@pytest.fixture
def requests(tmp_path):
    "The file the stand-in appends each request to."
    return tmp_path/"requests.log"

NAME_KERNEL = "import qlora_nb\n" + STAND_IN + "from qlora_nb.quant import cpu_4bit_kernel\nprint(cpu_4bit_kernel())"

@asks_on_this_cpu
def test_the_kernel_is_named_whether_or_not_the_hub_is_allowed(hub, requests):
    env = hub.env(KERNELS_REQUESTS=str(requests))
    r = python(NAME_KERNEL, env)
    assert (r.returncode, r.stdout.split()[-1:]) == (0, ["bitsandbytes-avx512bf16"]), r.stderr[-3000:]
    assert not requests.exists()  # bitsandbytes never asked
    r = python(NAME_KERNEL, env | {"QLORA_NB_HUB_KERNELS": "1"})
    assert (r.returncode, r.stdout.split()[-1:]) == (0, ["hub"]), r.stderr[-3000:]
    assert requests.read_text() == "kernels-community/quantization-bitsandbytes\n"
    assert hub.connections == 0  # the stand-in answered


@asks_on_this_cpu
def test_bitsandbytes_imported_first_is_reported(hub, requests):  # the guard cannot act; qlora_nb says so, once
    r = python(STAND_IN + "import bitsandbytes, qlora_nb, importlib\nimportlib.reload(qlora_nb)",
               hub.env(KERNELS_REQUESTS=str(requests)))
    assert r.returncode == 0 and r.stderr.count("HubKernelWarning") == 1, r.stderr[-3000:]
    assert requests.read_text() == "kernels-community/quantization-bitsandbytes\n"
