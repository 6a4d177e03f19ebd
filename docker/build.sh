#!/usr/bin/env bash
# Builds (and with --push, pushes) the images with every version from infra/versions.env passed
# as a build arg, so an image can never be built with versions other than the pinned ones.
#
#   docker/build.sh gpu|cpu|cpu-dev|mlflow|all [--push] [extra `docker build` flags...]
#
# Tags come from versions.env (GPU_IMAGE, CPU_IMAGE, CPU_DEV_IMAGE, MLFLOW_IMAGE); to push to
# another registry, change IMAGE_REGISTRY and those four lines together (tests check they agree).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: docker/build.sh gpu|cpu|cpu-dev|mlflow|all [--push] [docker build flags]}"
shift
push=0
if [[ "${1:-}" == "--push" ]]; then push=1; shift; fi

build_args=()
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  key="${line%%=*}"
  value="${line#*=}"
  value="${value%\"}"
  value="${value#\"}"
  build_args+=(--build-arg "${key}=${value}")
done < infra/versions.env

# shellcheck disable=SC1091
set -a; . infra/versions.env; set +a

build() {  # build <dockerfile> <tag> [docker build flags...]
  local dockerfile="$1" tag="$2"
  shift 2
  DOCKER_BUILDKIT=1 docker build -f "$dockerfile" -t "$tag" "${build_args[@]}" "$@" .
  if (( push )); then docker push "$tag"; fi
}

case "$target" in
  gpu)     build docker/gpu/Dockerfile "$GPU_IMAGE" "$@" ;;
  cpu)     build docker/cpu/Dockerfile "$CPU_IMAGE" --target runtime "$@" ;;
  cpu-dev) build docker/cpu/Dockerfile "$CPU_DEV_IMAGE" --target dev "$@" ;;
  mlflow)  build docker/mlflow/Dockerfile "$MLFLOW_IMAGE" "$@" ;;
  all)
    build docker/cpu/Dockerfile "$CPU_IMAGE" --target runtime "$@"
    build docker/cpu/Dockerfile "$CPU_DEV_IMAGE" --target dev "$@"
    build docker/mlflow/Dockerfile "$MLFLOW_IMAGE" "$@"
    build docker/gpu/Dockerfile "$GPU_IMAGE" "$@"
    ;;
  *) echo "unknown target: $target" >&2; exit 2 ;;
esac
