#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml with pip-compile (pip-tools), run from a throwaway venv:
#   bash scripts/lock.sh                        re-resolve after editing pyproject.toml; every pin that still fits is kept
#   bash scripts/lock.sh --upgrade              move every package to the newest release its ranges allow
#   bash scripts/lock.sh -P transformers        move one package (also -P 'transformers==5.26.0')
# Arguments go to every pip-compile call. Writes, in this order:
#   requirements/dev.txt    base dependencies + the `dev` extra: what scripts/setup_env.sh installs
#   requirements/tools.txt  pip (the set-up installs this pip first) and pip-tools, constrained by dev.txt
#   requirements/bench.txt  dev.txt + the `bench` extra (trl, psutil) for bench/: `pip install -r requirements/bench.txt`
#   requirements/gguf.txt   dev.txt + the `gguf` extra (llama-cpp-python) for `qlora-nb export`: the set-up installs it
#                           when asked (QLORA_NB_EXTRAS=gguf), since it compiles llama.cpp the first time
# then commit them with pyproject.toml; tests/test_lock.py fails while a lock and pyproject.toml disagree.
# The locks are resolved for the Python that runs this script (python3, or $PYTHON), the one the set-up uses.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
# The torch the locks hold: the CPU build these machines keep on disk (PIP_FIND_LINKS=/opt/wheels). Left free, the
# resolver takes the newest torch on the registry, a CUDA build that pulls several GB of nvidia-* packages.
TORCH="torch==2.13.0"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
if [ -f requirements/tools.txt ]; then
  "$tmp/venv/bin/python" -m pip install -q -r requirements/tools.txt
else  # the very first lock
  "$tmp/venv/bin/python" -m pip install -q pip-tools==7.6.2
fi
# each lock's header names the command that wrote it, and the pip-compile that ran
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh  (pip-tools $("$tmp/venv/bin/pip-compile" --version | sed 's/.* //') in a throwaway venv; torch held at ${TORCH#torch==}, the CPU build)"
compile() {  # no index or find-links lines (they are this machine's paths), pip and setuptools pinned too
  "$tmp/venv/bin/pip-compile" -q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
    --no-emit-trusted-host "$@"
}
echo "==> requirements/dev.txt (pyproject.toml: dependencies + dev)"
compile --extra dev -P "$TORCH" -o requirements/dev.txt "$@" pyproject.toml
echo "==> requirements/tools.txt (requirements/tools.in)"
compile -c requirements/dev.txt -o requirements/tools.txt "$@" requirements/tools.in
echo "==> requirements/bench.txt (pyproject.toml: dependencies + dev + bench, constrained by dev.txt)"
compile --extra dev --extra bench -c requirements/dev.txt -P "$TORCH" -o requirements/bench.txt "$@" pyproject.toml
echo "==> requirements/gguf.txt (pyproject.toml: dependencies + dev + gguf, constrained by dev.txt)"
compile --extra dev --extra gguf -c requirements/dev.txt -P "$TORCH" -o requirements/gguf.txt "$@" pyproject.toml
"$tmp/venv/bin/python" - <<'PY'
import re
for f in ("requirements/dev.txt", "requirements/tools.txt", "requirements/bench.txt", "requirements/gguf.txt"):
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open(f).read(), re.M))
    key = {k: pins[k] for k in ("pip", "torch", "transformers", "kernels", "accelerate", "peft", "bitsandbytes",
                                "datasets", "nbdev", "trl", "llama-cpp-python") if k in pins}
    print(f"{f}: {len(pins)} pins;", ", ".join(f"{k} {v}" for k, v in key.items()))
PY
