#!/usr/bin/env bash
# Regenerate every generated file of the repository from the mixin's default config, and the copies the
# package ships (`ollama-exporter assets`). tests/test_mixin.py fails when any of them drifts from this.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ollama-exporter ] || bash scripts/test.sh --collect-only -q >/dev/null  # creates .venv
.venv/bin/ollama-exporter mixin build --out .
.venv/bin/ollama-exporter mixin build --out ollama_exporter/assets
install -D -m 0644 -t ollama_exporter/assets/systemd systemd/ollama-exporter.service systemd/ollama-exporter.env
install -D -m 0644 -t ollama_exporter/assets/examples examples/mixin.yml
