#!/usr/bin/env bash
# Set up (idempotent) and run the end-to-end demo. Extra arguments go to scripts/demo.py.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
exec "$REPO/.venv/bin/python" "$REPO/scripts/demo.py" "$@"
