#!/usr/bin/env bash
# One command: set up, then run the linters and every test (unit tests of the
# policy, and integration tests against real Kamailio and SIPp on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
