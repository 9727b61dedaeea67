#!/usr/bin/env bash
# Build the container image with podman or docker, labelled with the package's version, the git
# revision and the build time. Usage:
#   scripts/build-image.sh [-t TAG] [ENGINE BUILD OPTIONS...]
# ENGINE is $CONTAINER_ENGINE, else podman, else docker. The default tags are ollama-exporter:<version> and
# ollama-exporter:latest.
# Anything else goes to `<engine> build`, e.g. `--build-arg BASE_IMAGE=...` or `--platform linux/arm64`.
set -euo pipefail
cd "$(dirname "$0")/.."

engine="${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}"
[ -n "$engine" ] || { echo "build-image.sh: neither podman nor docker found" >&2; exit 1; }

version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' ollama_exporter/__init__.py)"
[ -n "$version" ] || { echo "build-image.sh: no __version__ in ollama_exporter/__init__.py" >&2; exit 1; }
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain 2>/dev/null)" ] || revision="$revision-dirty"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

tags=(--tag "ollama-exporter:$version" --tag "ollama-exporter:latest")
if [ "${1:-}" = "-t" ]; then tags=(--tag "$2"); shift 2; fi

format=()
case "$(basename "$engine")" in podman|buildah) format=(--format docker) ;; esac  # keeps HEALTHCHECK

set -x
exec "$engine" build "${format[@]}" "${tags[@]}" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
  "$@" .
