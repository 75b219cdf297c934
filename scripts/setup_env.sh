#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install qlora_nb with its dev tools.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again: it reinstalls only when
# pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${QLORA_NB_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ "$VENV" = none ]; then  # an environment prepared by hand (an offline GPU machine): use it as it is
  "$PY" -c "import qlora_nb, torch, transformers, peft, bitsandbytes" || { echo "QLORA_NB_VENV=none: $PY cannot import qlora_nb and its dependencies" >&2; exit 1; }
  return 0 2>/dev/null || exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.qlora_nb_installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing qlora_nb and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # A plain `torch` requirement with no torch present pulls a several-GB CUDA build; torch 2.13.0 is the
  # CPU build these machines keep on disk. A machine that already has a torch keeps it.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q torch
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # qlora-nb answers --help and flag typos from a table of flag names it builds once (importing transformers takes
  # seconds): build it now, so a newcomer's first command is not the slow one
  "$VENV/bin/qlora-nb" train --help > /dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
