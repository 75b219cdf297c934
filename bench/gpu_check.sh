#!/usr/bin/env bash
# GPU check at real sizes (bench/gpu_check.py; how to run it: bench/RESULTS.md, "GPU check at real sizes: how to run").
#   bash bench/gpu_check.sh --download          # here, with registry access: wheels into bench/_wheelhouse/ (git-ignored)
#   bash bench/gpu_check.sh [gpu_check.py flags]  # on the GPU machine, offline, with bench/_wheelhouse/ carried along
# On the GPU machine it installs the wheelhouse into /tmp/site, in front of the image's own packages (its CUDA torch
# and triton stay), runs the notebooks' `#| cuda` cells where nbdev is installed, then bench/gpu_check.py (table
# last). Without a wheelhouse it uses scripts/setup_env.sh as before (QLORA_NB_VENV=none: an environment by hand).
# Before gpu_check.py starts its --budget_s clock, the install and the import checks took 75 s or more on a fresh H200
# machine and about 55 s on a warm one (2026-12-04): give an outer `timeout` at least --budget_s + 100 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=bench/_wheelhouse
# The versions the CPU tests run with, of what the H200 image ('cuda', /work/.library/device/KINDS.md) lacks or holds
# in another version; torch, triton, tokenizers, safetensors, pyarrow, pandas, psutil, xxhash come from the image.
# bitsandbytes is 41 MiB of the 58: the tree that travels (carried paths included) must stay under 64 MiB.
PKGS=(bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1
      multiprocess==0.70.19 evaluate==0.4.6 fastcore==2.2.41 trl==1.16.0 liger-kernel==0.8.5)

if [ "${1:-}" = --download ]; then
  PYVER="${PYVER:-3.12}"  # the GPU machine's python (3.12 on the H200 image of 2026-11-28)
  platforms=()
  for t in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do platforms+=(--platform "$t"); done
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    "${platforms[@]}" -d "$WHEELS" "${PKGS[@]}" "${@:2}"
  ls -l "$WHEELS"; du -sh "$WHEELS"
  echo "carry it: run(..., carry=[\"$WHEELS\"]) -- the device copy of the tree takes git-ignored paths only when named"
  exit 0
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE="${GPU_CHECK_SITE:-/tmp/site}"  # over the image's own packages, as bench/RESULTS.md's first GPU check did
  echo "==> installing $WHEELS/*.whl into $SITE (no index, no dependencies: the image has the rest)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"  # qlora_nb from this checkout
else
  echo "==> no wheels in $WHEELS: using scripts/setup_env.sh"
  source scripts/setup_env.sh
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: install a CUDA build of torch')"
python3 -c "import qlora_nb.train, trl" || { echo "qlora_nb or trl does not import (above)" >&2; exit 1; }
python3 -c "import flash_attn" 2>/dev/null || echo "note: flash-attn is not installed (the registry has only its" \
  "source, which builds with nvcc or fetches a prebuilt wheel from GitHub: not offline): SDPA only"
python3 -c "import torch, transformers, peft, bitsandbytes, trl; print('versions: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__)"
# GPU_CHECK_NOTEBOOKS=skip: not the notebooks (a command that must leave its time to the table); =only: nothing else
NOTEBOOKS="${GPU_CHECK_NOTEBOOKS:-run}"
if [ "$NOTEBOOKS" != skip ]; then
  echo "==> notebooks' #| cuda cells"
  nb_failed=0
  for nb in $(grep -l '"#| cuda' nbs/*.ipynb); do
    if command -v nbdev-test > /dev/null; then nbdev-test --flags cuda "$nb" || nb_failed=1
    else  # nbdev is not in the wheelhouse (no room beside bitsandbytes): the cells in order, as nbdev-test runs them
      timeout 300 python3 bench/gpu_check.py --notebook "$nb" || { nb_failed=1; echo "FAILED: $nb's cells (above)"; }
    fi
  done
  if [ "$NOTEBOOKS" = only ]; then exit "$nb_failed"; fi
else echo "note: GPU_CHECK_NOTEBOOKS=skip: the notebooks' #| cuda cells are not run"; fi
echo "==> qlora-nb vs TRL at real sizes, then FSDP-QLoRA ($SECONDS s after the start of gpu_check.sh)"
python3 bench/gpu_check.py "$@"
