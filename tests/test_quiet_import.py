"""bitsandbytes' probe of the optional kernels hub (a warning on AVX512-BF16 CPUs) never reaches a qlora_nb user, and
nothing else is hidden. Each case runs in a fresh process: the filter must be in place before bitsandbytes loads."""
import subprocess, sys
from pathlib import Path

from conftest import ENV, ROOT
BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"
# the record exactly as bitsandbytes 0.50 logs it when `kernels` is not installed
EMIT_PROBE = f"""
import logging
logging.getLogger({BNB_CPU_OPS!r}).warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. "
    "Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
    ModuleNotFoundError("No module named 'kernels'"))
"""

def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)

def test_the_message_filtered_is_the_one_bitsandbytes_logs():
    import importlib.util, qlora_nb
    ops = Path(importlib.util.find_spec("bitsandbytes").submodule_search_locations[0])/"backends"/"cpu"/"ops.py"
    assert qlora_nb._KERNELS_HUB_PROBE in ops.read_text(), "bitsandbytes changed the message: update the filter"

def test_without_qlora_nb_the_probe_shows():  # so the next test can fail
    r = python(EMIT_PROBE)
    assert "Failed to load CPU gemm_4bit_forward" in r.stderr, r.stderr

def test_importing_qlora_nb_hides_the_probe_and_imports_nothing_heavy():
    r = python("import sys, qlora_nb\nassert not {'torch', 'bitsandbytes', 'transformers'} & set(sys.modules)\n"
               + EMIT_PROBE + "\nimport bitsandbytes")
    assert r.returncode == 0 and r.stderr == "", r.stderr

def test_other_bitsandbytes_warnings_still_show():
    r = python("import qlora_nb, logging\nimport bitsandbytes\n"
               f"logging.getLogger({BNB_CPU_OPS!r}).warning('some other problem with the CPU kernels')")
    assert "some other problem with the CPU kernels" in r.stderr, r.stderr
