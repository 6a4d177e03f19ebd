#!/usr/bin/env bash
# Builds (and with --push, pushes) the images with every version from infra/versions.env passed
# as a build arg, so an image can never be built with versions other than the pinned ones.
#
#   docker/build.sh gpu|gpu-blackwell|cpu|cpu-dev|mlflow|all [--push] [extra `docker build` flags...]
#
# Tags come from versions.env (GPU_IMAGE, GPU_BLACKWELL_IMAGE, CPU_IMAGE, CPU_DEV_IMAGE,
# MLFLOW_IMAGE); to push to another registry, change IMAGE_REGISTRY and those lines together
# (tests check they agree). gpu-blackwell is docker/gpu/Dockerfile again, with each
# BLACKWELL_<KEY> of versions.env passed as <KEY> (CUDA 13.0, its arch list, its base image).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: docker/build.sh gpu|gpu-blackwell|cpu|cpu-dev|mlflow|all [--push] [docker build flags]}"
shift
push=0
if [[ "${1:-}" == "--push" ]]; then push=1; shift; fi

# Parallel arrays, not an associative one: macOS's bash 3.2 has none.
keys=()
values=()
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  key="${line%%=*}"
  value="${line#*=}"
  value="${value%\"}"
  value="${value#\"}"
  keys+=("$key")
  values+=("$value")
done < infra/versions.env

# shellcheck disable=SC1091
set -a; . infra/versions.env; set +a

build_args=()
set_build_args() {  # set_build_args [VARIANT]: every pin, VARIANT_<KEY>'s value in place of <KEY>'s
  local variant="${1:-}" i j value
  build_args=()
  for i in "${!keys[@]}"; do
    value="${values[$i]}"
    for j in "${!keys[@]}"; do
      if [[ -n "$variant" && "${keys[$j]}" == "${variant}_${keys[$i]}" ]]; then value="${values[$j]}"; fi
    done
    build_args+=(--build-arg "${keys[$i]}=${value}")
  done
}

build() {  # build <dockerfile> <tag> [docker build flags...]
  local dockerfile="$1" tag="$2"
  shift 2
  DOCKER_BUILDKIT=1 docker build -f "$dockerfile" -t "$tag" "${build_args[@]}" "$@" .
  if (( push )); then docker push "$tag"; fi
}

set_build_args

case "$target" in
  gpu)     build docker/gpu/Dockerfile "$GPU_IMAGE" "$@" ;;
  gpu-blackwell)
    set_build_args BLACKWELL
    build docker/gpu/Dockerfile "$GPU_BLACKWELL_IMAGE" "$@"
    ;;
  cpu)     build docker/cpu/Dockerfile "$CPU_IMAGE" --target runtime "$@" ;;
  cpu-dev) build docker/cpu/Dockerfile "$CPU_DEV_IMAGE" --target dev "$@" ;;
  mlflow)  build docker/mlflow/Dockerfile "$MLFLOW_IMAGE" "$@" ;;
  all)
    build docker/cpu/Dockerfile "$CPU_IMAGE" --target runtime "$@"
    build docker/cpu/Dockerfile "$CPU_DEV_IMAGE" --target dev "$@"
    build docker/mlflow/Dockerfile "$MLFLOW_IMAGE" "$@"
    build docker/gpu/Dockerfile "$GPU_IMAGE" "$@"
    set_build_args BLACKWELL
    build docker/gpu/Dockerfile "$GPU_BLACKWELL_IMAGE" "$@"
    ;;
  *) echo "unknown target: $target" >&2; exit 2 ;;
esac
