"""nbs/analysis/real_model.ipynb where SmolLM2 cannot be fetched: its tests pass, with the rest of the notebook skipped
and the reason printed, unless QLORA_NB_REAL_MODEL=required, which turns that into a failure that says why. An empty
cache and a pip without an index make `get_model` fail at once, as it would without network (about 30 s in all)."""
import subprocess, sys
from pathlib import Path

from helpers import ENV, ROOT

NOTEBOOK = ROOT/"nbs"/"analysis"/"real_model.ipynb"


def run_notebook_tests(tmp_path, **env) -> subprocess.CompletedProcess:
    "`nbdev-test` of the notebook with an empty cache and no package index (neither SmolLM2 nor the tiny base is there)."
    no_model = {"QLORA_NB_CACHE": str(tmp_path/"cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "HF_HUB_OFFLINE": "1"}
    base = {k: v for k, v in ENV.items() if k != "QLORA_NB_REAL_MODEL"}  # CI sets it for the other tests
    return subprocess.run([str(Path(sys.executable).parent/"nbdev-test"), str(NOTEBOOK)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**base, **no_model, **env})


def test_without_the_model_the_notebook_skips_what_needs_it(tmp_path):
    done = run_notebook_tests(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path/"cache"/"models"/"smollm2-135m-instruct").exists()
    assert not list((tmp_path/"cache").glob("demo-base-*"))  # the tiny base's cell was skipped too, not built


def test_required_the_missing_model_fails_with_its_reason(tmp_path):
    done = run_notebook_tests(tmp_path, QLORA_NB_REAL_MODEL="required")
    assert done.returncode != 0
    assert "QLORA_NB_REAL_MODEL=required, and SmolLM2 cannot be fetched" in done.stdout + done.stderr
