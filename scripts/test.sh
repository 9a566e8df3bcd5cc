#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, then the integration
# tests on real Open vSwitch, Mininet and CRIU. Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider "$@" tests
