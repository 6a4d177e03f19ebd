#!/usr/bin/env bash
# Installs the project (and, with --dev, its test tools) into the current Python.
#   bash scripts/install.sh [--dev]
# torch is installed first and only when missing, so an existing build (CPU or CUDA) is kept:
#   - a machine with an NVIDIA GPU gets the default CUDA build from PyPI;
#   - a CPU-only machine gets the CPU build (small), from a local wheel dir if pip is set up
#     with one, else from PyTorch's CPU index (override with TORCH_CPU_INDEX_URL).
# GPU machines also get the torchvision built for their torch (the GPU decode path needs it).
#
# Nothing outside this Python changes without a line saying so:
#   - setuptools is never upgraded by this script (the package's build runs in pip's isolated
#     build environment, which gets its own setuptools>=68); when pip upgrades the Python's own
#     setuptools because a dependency asks for a newer one (torch 2.13: >=77.0.3), a note names
#     the versions and who asked;
#   - when this Python already has convmae-service installed editable from another checkout,
#     one line names both paths before the install re-points every user of this Python to this
#     checkout (a virtual environment per checkout avoids that).
set -euo pipefail

PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
PACKAGE="convmae-service"

# `pip show` of one distribution (empty when it is not installed); a function so that tests
# can stand in for pip.
pip_show() {
  "$PY" -m pip show "$1" 2>/dev/null || true
}

# The checkout an editable install of PACKAGE in this Python points at; empty when there is
# none (not installed, or installed as a plain wheel).
editable_location() {
  pip_show "$PACKAGE" | sed -n 's/^Editable project location: *//p'
}

# Says in one line when installing from checkout $1 re-points this Python's editable install
# of PACKAGE away from another checkout (CI and second clones do that on purpose).
check_editable_elsewhere() {
  local here="$1" there
  there="$(editable_location)"
  [[ -z "$there" ]] && return 0
  here="$(cd "$here" && pwd -P)"
  if [[ -d "$there" ]]; then there="$(cd "$there" && pwd -P)"; fi
  [[ "$there" == "$here" ]] && return 0
  local python
  python="$("$PY" -c 'import sys; print(sys.prefix)')"
  echo "install.sh: re-pointing the editable $PACKAGE of $python from $there to $here" \
       "(every user of this Python gets this checkout; a virtual environment keeps both)" >&2
}

setuptools_version() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("setuptools"))' 2>/dev/null || echo none
}

# A note when setuptools changed from $1 to $2 in this Python, naming the installed
# distributions whose own requirement $1 did not meet.
setuptools_note() {
  local before="$1" after="$2"
  [[ "$before" == "$after" ]] && return 0
  local askers
  askers="$("$PY" - "$before" <<'EOF'
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement
from packaging.version import Version

before = sys.argv[1]
askers = []
for dist in metadata.distributions():
    for text in dist.requires or []:
        req = Requirement(text)
        if req.name.lower() != "setuptools" or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if before == "none" or not req.specifier.contains(Version(before), prereleases=True):
            askers.append(f"{dist.metadata['Name']} requires {req}")
print("; ".join(sorted(set(askers))) or "a dependency asked for it")
EOF
)" || askers="a dependency asked for it"
  echo "note: pip changed setuptools $before -> $after in $("$PY" -c 'import sys; print(sys.prefix)')" \
       "($askers); this script never upgrades it itself" >&2
}

main() {
  local extra="" arg
  for arg in "$@"; do
    case "$arg" in
      --dev) extra="[dev]" ;;
      *) echo "install.sh: unknown option '$arg'; allowed: --dev (test tools)" >&2
         return 2 ;;
    esac
  done
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  check_editable_elsewhere "$PWD"
  local setuptools_before
  setuptools_before="$(setuptools_version)"

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
  if command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torchvision" 2>/dev/null; then
    local cuda
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
  setuptools_note "$setuptools_before" "$(setuptools_version)"
  # CPU machines: DeepSpeed JIT-builds its shared-memory collectives op the first time a worker
  # starts (tens of seconds); build it into the user's extension cache now instead. Only a speed-up:
  # a failure here leaves the build to the first run.
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
      || echo "note: DeepSpeed's shm comm op was not prebuilt; the first training run builds it"
  fi
}

# Sourced (by tests), it only defines the functions above.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
