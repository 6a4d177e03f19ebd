#!/usr/bin/env bash
# Entrypoint of the convmae images (GPU and CPU).
#
#   <image> head   [ray start flags]   Ray head in the foreground (compose, plain `docker run`)
#   <image> worker [ray start flags]   Ray worker joining $RAY_HEAD_ADDRESS (host:port)
#   <image> <any command>              run it as is: `ray job submit ...`, `python jobs/...`, `bash`
#
# KubeRay and the Ray cluster launcher never reach this script for head/worker start: KubeRay
# replaces the container command with its own `ray start`, and the launcher runs `bash` here and
# then `docker exec`s its start commands. Both paths therefore need nothing from this file
# beyond passing the command through untouched.
set -euo pipefail

# Ray opens a socket per worker and object transfer; the Docker default (1024) breaks big jobs.
# Best effort: an unprivileged container may only raise the soft limit up to the hard one.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --block keeps `ray start` in the foreground, so the container lives exactly as long as Ray
# does and `docker stop` (SIGTERM) reaches it.
case "${1:-}" in
  head)
    shift
    exec ray start --head --block \
      --port="${RAY_GCS_PORT:-6379}" \
      --dashboard-host=0.0.0.0 \
      --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
      "$@"
    ;;
  worker)
    shift
    : "${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS=host:port of the Ray head (GCS port)}"
    exec ray start --block --address="${RAY_HEAD_ADDRESS}" "$@"
    ;;
  "")
    exec bash
    ;;
  *)
    exec "$@"
    ;;
esac
