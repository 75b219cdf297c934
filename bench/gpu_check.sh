#!/usr/bin/env bash
# bash bench/gpu_check.sh   -- on a machine with one CUDA GPU; under 8 minutes on an H100-class card; table last.
# 1) the notebooks' `#| cuda` cells, 2) QLoRA 4-bit vs bf16 LoRA on a ~1B Llama built from a config, 3) the same
# QLoRA run under FSDP (qlora_nb/configs/fsdp_qlora.yaml, one process) -- all in bench/gpu_check.py but the first.
# On an offline machine with the dependencies installed by hand: QLORA_NB_VENV=none bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: install a CUDA build of torch into .venv')"
echo "==> notebooks' #| cuda cells"
for nb in $(grep -l '"#| cuda' nbs/*.ipynb); do nbdev-test --flags cuda "$nb"; done
echo "==> QLoRA vs LoRA on a ~1B Llama, and QLoRA under FSDP"; python3 bench/gpu_check.py "$@"
