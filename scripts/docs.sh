#!/usr/bin/env bash
# Build the documentation site into _docs/ (git-ignored): a page per notebook with its committed outputs, in the
# notebooks' order, each exported symbol's API entry, and api.html; open _docs/index.html. `--out DIR` writes elsewhere.
# nbdev's own site needs Quarto, which cannot be installed here (its Python package downloads the Quarto binary at
# install time), so scripts/docs.py renders the notebooks with nbconvert, the Jupyter project's own exporter, already
# among the dev tools. No notebook is executed: outputs are whatever is committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"                      # an environment chosen by the caller (the tests)
elif [ -x "${QLORA_NB_VENV:-.venv}/bin/python" ]; then py="${QLORA_NB_VENV:-.venv}/bin/python"
else source scripts/setup_env.sh; py=python; fi                  # first run: create the environment
"$py" scripts/docs.py "$@"
