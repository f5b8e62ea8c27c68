#!/usr/bin/env bash
# The GPU check (issue 14), for a machine with a CUDA GPU and PyTorch, nothing downloaded; about 2-4 minutes:
#   1. tests/test_device.py on the GPU: R2's kernels against the functional losses, a bf16 training step, DKM and PTQ
#      against the CPU, a few R2Trainer steps in bf16;
#   2. benchmarks/r2_overhead.py on the GPU: R2 forward + backward over one SGD step, per loss and mode, and the whole
#      training step with R2 over without (224x224 batch 64, 32x32 batch 256).
# Run from the repository root: `bash benchmarks/gpu_check.sh [OUT_DIR]` (DEVICE=cpu runs the same on the CPU, to
# check the script itself). The package is used from the checkout (PYTHONPATH), with the machine's own torch, timm
# and transformers; their versions are printed first.
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=${PYTHON:-python3}
{
  echo "== $(date -u +%FT%TZ) device=$device"
  $py -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  echo "== tests/test_device.py"
  start=$SECONDS
  HF_R2_TEST_DEVICE=$device $py -m pytest -q -p no:cacheprovider tests/test_device.py; tests_rc=$?
  echo "tests: rc=$tests_rc in $((SECONDS - start)) s"
  echo "== benchmarks/r2_overhead.py"
  start=$SECONDS
  steps=224x224x64,32x32x256
  [ "$device" = cpu ] && steps=16x16x2
  $py benchmarks/r2_overhead.py --device "$device" --no-naive --repeats "${REPEATS:-25}" --step "$steps" \
    --models "${MODELS:-resnet18,mobilenetv2_100}"; bench_rc=$?
  echo "benchmark: rc=$bench_rc in $((SECONDS - start)) s"
  [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
} 2>&1 | tee "$out/gpu_check.txt"
exit "${PIPESTATUS[0]}"
