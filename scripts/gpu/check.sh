#!/usr/bin/env bash
# Run the GPU-marked tests on a GPU machine (bring the carry of wheels, see docs/gpu.md):
#   source .carry/bootstrap.sh && bash scripts/gpu/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_packed.py tests/test_megatron_backend.py "$@"
