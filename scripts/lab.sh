#!/usr/bin/env bash
# One command: set up, start the lab PBX (Kamailio on loopback), run the agent
# registered to it over UDP, TCP and TLS, print its status and put a call
# through. Ctrl-C unregisters and stops. Pass --once to stop after the call.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m lab.demo "$@"
