#!/usr/bin/env bash
# Set up everything the agent, the lab PBX and the tests need on Debian 12
# with Python 3.11: the real SIP peers from Debian (SIPp, Kamailio with TLS,
# openssl for the test CA) and the project in a virtualenv at .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
command -v sipp >/dev/null || need+=(sip-tester)
command -v kamailio >/dev/null || need+=(kamailio)
ls /usr/lib/*/kamailio/modules/tls.so >/dev/null 2>&1 || need+=(kamailio-tls-modules)  # the lab's TLS PBX only
ls /usr/lib/*/kamailio/modules/evapi.so >/dev/null 2>&1 || need+=(kamailio-extra-modules)  # the edge: evapi
command -v rtpengine >/dev/null || need+=(rtpengine-daemon)  # the edge's media relay (userspace)
command -v haproxy >/dev/null || need+=(haproxy)  # the edge's TLS proxy
command -v openssl >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)  # promtool checks deploy/prometheus
command -v systemd-analyze >/dev/null || need+=(systemd)  # verifies config/uac-agent.service
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)  # a real DNS server (SRV) for the DNS tests
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's package may start its own Kamailio service; the lab and the tests
# run their own instances on other ports, so it is left alone.

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done (.venv, $(.venv/bin/python --version), $(sipp -v 2>/dev/null | grep -o 'SIPp v[0-9.]*' | head -1), $(kamailio -v | head -1))"
