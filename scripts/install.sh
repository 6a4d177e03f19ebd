#!/usr/bin/env bash
# Installs the project (and, with --dev, its test tools) into the current Python.
# torch is installed first and only when missing, so an existing build (CPU or CUDA) is kept:
#   - a machine with an NVIDIA GPU gets the default CUDA build from PyPI;
#   - a CPU-only machine gets the CPU build (small), from a local wheel dir if pip is set up
#     with one, else from PyTorch's CPU index (override with TORCH_CPU_INDEX_URL).
# GPU machines also get the torchvision built for their torch (the GPU decode path needs it).
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [[ "${1:-}" == "--dev" ]]; then extra="[dev]"; fi
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch==${TORCH_VERSION}"
  else
    "$PY" -m pip install "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
      || "$PY" -m pip install "torch==${TORCH_VERSION}" \
           --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
fi
# GPU machines: torchvision for data.decode=gpu (nvJPEG), the build made for the installed
# torch: same release pairing (infra/versions.env) and same CUDA index, without dependencies so
# that torch itself is never replaced. CPU machines never import torchvision and skip it.
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
if command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torchvision" 2>/dev/null; then
  cuda="$("$PY" -c "import torch; print((torch.version.cuda or '').replace('.', ''))")"
  if [[ -n "$cuda" ]]; then
    "$PY" -m pip install --no-deps "torchvision==${TORCHVISION_VERSION}" \
        --index-url "https://download.pytorch.org/whl/cu${cuda}" \
      || "$PY" -m pip install --no-deps "torchvision==${TORCHVISION_VERSION}"
  fi
fi
# DeepSpeed's build imports torch: build it against the torch installed above.
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install --no-build-isolation "deepspeed>=0.16"
fi
"$PY" -m pip install -e ".${extra}"
# CPU machines: DeepSpeed JIT-builds its shared-memory collectives op the first time a worker
# starts (tens of seconds); build it into the user's extension cache now instead. Only a speed-up:
# a failure here leaves the build to the first run.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
    || echo "note: DeepSpeed's shm comm op was not prebuilt; the first training run builds it"
fi
