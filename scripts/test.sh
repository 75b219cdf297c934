#!/usr/bin/env bash
# The README's test command: set up the environment, then check that the notebooks, the exported package
# and README.md agree, run every notebook's tests, and run the pytest suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
if [ ! -x /usr/bin/chromium ] && [ -z "${QLORA_NB_CHROMIUM:-}" ]; then
  # the JupyterLab browser test drives Debian's Chromium through Playwright (never `playwright install`)
  echo "==> installing Debian's chromium for the browser test"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

unchanged() {  # fail when the working tree differs from before the command ran
  local before after
  before="$(git status --porcelain; git diff)"
  "$@" >/dev/null
  after="$(git status --porcelain; git diff)"
  if [ "$before" != "$after" ]; then
    echo "FAILED: '$*' changed files; run it and commit the result:"; git status --porcelain; exit 1
  fi
}
echo "==> nbdev-clean changes nothing";  unchanged nbdev-clean
echo "==> nbdev-export changes nothing"; unchanged nbdev-export
echo "==> README.md agrees with nbs/index.ipynb"; python scripts/make_readme.py --check
echo "==> the notebooks keep their outputs"; python scripts/run_notebooks.py --check
echo "==> nbdev-test (every notebook, top to bottom)"; nbdev-test --n-workers "${NBDEV_WORKERS:-2}"
echo "==> pytest tests/"; python -m pytest tests/ "$@"
