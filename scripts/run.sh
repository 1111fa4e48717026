#!/usr/bin/env bash
# Quick start, command 1: set up, then run the whole pipeline on the embedded default world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/instructrl pipeline --out "${1:-runs/default}" "${@:2}"
