# syntax=docker/dockerfile:1
#
# uac-agent image.
#   docker build -t uac-agent .
#   docker run --rm -v "$PWD/config.yaml:/etc/uac-agent/config.yaml:ro" --network host uac-agent
#
# The agent is a supervisor, its registration workers and its SIP edge
# (docs/edge.md): Kamailio, rtpengine and HAProxy, started and supervised by the
# agent. Only the edge listens on sip.bind: UDP and TCP on sip.port (5070), TLS
# on sip.tls_port (5071, open only with sip.tls_cert_file), and the media relay
# on sip.rtp_port .. + sip.rtp_port_range - 1 (40000-49999 UDP). Workers use
# loopback ports no one has to publish. Host networking is simplest; otherwise:
#   -p 5070:5070/udp -p 5070:5070/tcp -p 5071:5071/tcp \
#   -p 40000-40199:40000-40199/udp -p 8080:8080      (with sip.rtp_port_range: 200)
#
# The config must set sip.bind: 0.0.0.0 and http.listen: 0.0.0.0:8080 (or
# -e UAC_AGENT_SIP__BIND=0.0.0.0 -e UAC_AGENT_HTTP__LISTEN=0.0.0.0:8080; the image
# does not set them, so that the file's values are never silently overridden):
# the defaults (127.0.0.1) are unreachable from outside the container. Bound to
# 0.0.0.0, the agent tells each peer the container's address on the interface
# that routes to it, never 0.0.0.0. Behind NAT (published ports, not host
# networking), tell peers the public address instead (docs/configuration.md#nat):
#   -e UAC_AGENT_SIP__EXTERNAL_SIGNALING_ADDRESS=203.0.113.10
#   -e UAC_AGENT_SIP__EXTERNAL_MEDIA_ADDRESS=203.0.113.10      (default: the same)
#   -e 'UAC_AGENT_SIP__LOCAL_NETS=["10.0.0.0/8"]'               (peers told the local address)
# The HEALTHCHECK assumes the HTTP port is 8080.
# `docker exec <container> uac-agent status` shows every connection.
# This project's CI has no container engine: the image is not built there; its
# install step (pip install of the project) is the one the tests use.
# pjsua2-python ships x86_64 wheels only: build for linux/amd64.
# `docker stop` waits 10 s by default: keep shutdown_timeout_sec well below the
# stop timeout so every binding is unregistered before SIGKILL.

FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="uac-agent" \
      org.opencontainers.image.description="SIP UAC registration agent (pjsua2): registers to a PBX and keeps the registration alive" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Proprietary"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The edge's engines from Debian (the base image is Debian 12): Kamailio with
# its extra modules (evapi), rtpengine in userspace (no kernel module, no root)
# and HAProxy, which does all TLS with the system's OpenSSL 3. The CA bundle for
# sip.tls_ca_file is /etc/ssl/certs/ca-certificates.crt.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       kamailio kamailio-extra-modules rtpengine-daemon haproxy ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /tmp/src/
COPY agent /tmp/src/agent
RUN pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src

RUN groupadd --system --gid 10001 uac \
    && useradd --system --no-log-init --uid 10001 --gid uac --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin uac \
    && mkdir -p /etc/uac-agent \
    && install -d -m 0700 -o uac -g uac /var/lib/uac-agent

# With the default settings: the edge's SIP UDP+TCP (sip.port), TLS
# (sip.tls_port), the media relay's range, and HTTP (http.listen).
EXPOSE 5070/udp 5070/tcp 5071/tcp 40000-49999/udp 8080/tcp

# Connections created through the API: SQLite in $STATE_DIRECTORY (mount a
# volume to keep them across containers). `docker kill -s HUP` reloads the config.
ENV STATE_DIRECTORY=/var/lib/uac-agent \
    RUNTIME_DIRECTORY=/tmp/uac-agent
VOLUME ["/var/lib/uac-agent"]

USER 10001:10001

# /healthz answers 200 while the supervisor and its worker pool answer and every
# worker's heartbeat is fresh (a worker being replaced does not make it fail),
# 503 otherwise; urlopen raises on 503 or a refused connection, so the check
# exits 1 (with a traceback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["uac-agent"]
CMD ["run", "--config", "/etc/uac-agent/config.yaml"]
