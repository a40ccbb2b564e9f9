#!/usr/bin/env bash
# Set up (if needed) and run the demo on the bundled SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/upcycle demo "$@"
