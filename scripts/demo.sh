#!/usr/bin/env bash
# The README's main job: set up the environment, then run the offline QLoRA demo on a tiny model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
qlora-nb demo "$@"
