"""A SIPp registrar (UAS) on loopback, for tests, and a parser for its message trace.

``Sipp`` runs one scenario from ``sipp_scenarios/`` as a child process (foreground,
own session, no stdin) with ``-trace_msg``/``-trace_err`` files in a work directory,
and waits until SIPp has bound its SIP port.  ``received_requests()`` and
``sent_responses()`` parse the ``-trace_msg`` file into ``SipMessage`` objects.

SIPp 3.6.1 ``-trace_msg`` format (one block per message)::

    ----------------------------------------------- 2026-11-22 17:31:32.348764
    UDP message received [283] bytes :
    <blank line>
    REGISTER sip:... SIP/2.0<CRLF> ... <CRLF><CRLF>
    <blank line>
    ----------------------------------------------- 2026-11-22 17:31:32.350272
    UDP message sent (324 bytes):
    ...

The timestamp is SIPp's *local* time with microseconds and no zone; ``Sipp`` runs SIPp
with ``TZ=UTC`` so the trace it produces is parsed as UTC.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "SCENARIO_DIR",
    "SipMessage",
    "Sipp",
    "parse_message_log",
    "scenario_path",
]

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sipp_scenarios"
HOST = "127.0.0.1"

# Compact header forms (RFC 3261 7.3.3 and extensions) -> full lower-case names.
_COMPACT = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

_BLOCK_START = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)[ \t]*$", re.MULTILINE)
_DIRECTION = re.compile(r"^(\w+) message (received|sent)\b")
_EXPIRES_PARAM = re.compile(r";\s*expires\s*=\s*(\d+)", re.IGNORECASE)


def scenario_path(name: str) -> Path:
    """``sipp_scenarios/<name>`` (``.xml`` added when missing)."""
    if not name.endswith(".xml"):
        name += ".xml"
    return SCENARIO_DIR / name


@dataclass(frozen=True)
class SipMessage:
    """One SIP message from a SIPp message trace.

    ``headers`` maps lower-case full header names (compact forms expanded) to the
    values of each header line in order; comma-joined values are not split.
    """

    timestamp: float  # epoch seconds, microsecond resolution
    first_line: str
    headers: dict[str, list[str]]
    raw: str
    direction: str = ""  # "received" or "sent" (as seen by SIPp)
    transport: str = ""  # "UDP", "TCP", ...
    body: str = ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        values = self.headers.get(_canonical(name))
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return list(self.headers.get(_canonical(name), []))

    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/")

    @property
    def method(self) -> str | None:
        """Request method, or None for a response."""
        return self.first_line.split(" ", 1)[0] if self.is_request else None

    @property
    def status_code(self) -> int | None:
        """Response status code, or None for a request."""
        if self.is_request:
            return None
        parts = self.first_line.split(" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    @property
    def reason(self) -> str | None:
        if self.is_request:
            return None
        parts = self.first_line.split(" ", 2)
        return parts[2] if len(parts) > 2 else ""

    @property
    def call_id(self) -> str | None:
        return self.header("call-id")

    @property
    def cseq_number(self) -> int:
        value = self.header("cseq")
        if value is None:
            raise ValueError(f"no CSeq in {self.first_line!r}")
        return int(value.split()[0])

    @property
    def cseq_method(self) -> str | None:
        value = self.header("cseq")
        parts = value.split() if value else []
        return parts[1] if len(parts) > 1 else None

    @property
    def expires(self) -> int | None:
        """The Expires header, else the first Contact's ``;expires=`` parameter."""
        value = self.header("expires")
        if value is not None and value.strip().isdigit():
            return int(value.strip())
        for contact in self.header_all("contact"):
            # Parameters after the URI; inside <...> an "expires" would be a URI param.
            params = contact.rsplit(">", 1)[1] if ">" in contact else contact
            match = _EXPIRES_PARAM.search(params)
            if match:
                return int(match.group(1))
        return None

    @property
    def has_authorization(self) -> bool:
        return self.header("authorization") is not None


def _canonical(name: str) -> str:
    name = name.strip().lower()
    return _COMPACT.get(name, name)


def _parse_time(stamp: str, local_time: bool) -> float:
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
    parsed = datetime.strptime(stamp, fmt)
    if not local_time:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _parse_sip(text: str) -> tuple[str, dict[str, list[str]], str]:
    text = text.lstrip("\r\n")
    for sep in ("\r\n\r\n", "\n\n"):
        if sep in text:
            head, body = text.split(sep, 1)
            break
    else:
        head, body = text, ""
    lines = head.replace("\r\n", "\n").split("\n")
    first_line = lines[0].strip()
    unfolded: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and unfolded:
            unfolded[-1] += " " + line.strip()
        elif line.strip():
            unfolded.append(line.rstrip())
    headers: dict[str, list[str]] = {}
    for line in unfolded:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(_canonical(name), []).append(value.strip())
    return first_line, headers, body


def parse_message_log(source: str | Path, *, local_time: bool = False) -> list[SipMessage]:
    """Parse a SIPp ``-trace_msg`` file (a Path) or its text (a str).

    Timestamps are read as UTC unless ``local_time`` (for a SIPp that was not run
    with ``TZ=UTC``).  Blocks that are not SIP messages are skipped.
    """
    if isinstance(source, Path):
        if not source.exists():
            return []
        with source.open(encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()  # newline="": keep the messages' CRLFs
    else:
        text = source
    starts = list(_BLOCK_START.finditer(text))
    messages: list[SipMessage] = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        block = text[match.end() : end].lstrip("\n")
        intro, _, rest = block.partition("\n")
        direction = _DIRECTION.match(intro)
        if direction is None:
            continue
        raw = rest.lstrip("\r\n")
        # SIPp writes "<message>\n"; the message itself ends in CRLF CRLF.
        if raw.endswith("\n"):
            raw = raw[:-1]
        first_line, headers, body = _parse_sip(raw)
        if not first_line:
            continue
        messages.append(
            SipMessage(
                timestamp=_parse_time(match.group(1), local_time),
                first_line=first_line,
                headers=headers,
                raw=raw,
                direction=direction.group(2),
                transport=direction.group(1),
                body=body,
            )
        )
    return messages


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _bound_inodes(port: int, tcp: bool) -> set[str]:
    """Inodes of sockets bound to 127.0.0.1:port (UDP) or listening on it (TCP)."""
    table = "/proc/net/tcp" if tcp else "/proc/net/udp"
    want = f"0100007F:{port:04X}"
    inodes: set[str] = set()
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want and (not tcp or cols[3] == "0A"):
                    inodes.add(cols[9])
    except OSError:
        pass
    return inodes


@dataclass
class Sipp:
    """A SIPp process running ``scenario`` on 127.0.0.1:``port``.

    ``variables`` become ``-set NAME VALUE``; ``calls`` is ``-m`` (one call per
    Call-ID; the registrar scenarios serve every REGISTER of one Call-ID in a loop).
    With ``timeout`` SIPp stops by itself after that many seconds (``-timeout Ns
    -timeout_error``); otherwise call ``stop()`` (or use ``with``).
    """

    scenario: Path
    port: int
    variables: Mapping[str, str | int] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path("."))
    transport: str = "u1"  # "u1" (UDP) or "t1" (TCP)
    calls: int = 1
    timeout: float | None = None
    extra_args: Sequence[str] = ()
    sipp_bin: str = "sipp"
    # Client scenarios: where requests go ("host:port") and the Request-URI user
    # (-s); host is the local address to bind (another 127.0.0.0/8 address
    # makes a different source).
    remote: str | None = None
    service: str | None = None
    host: str = HOST
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    returncode: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.transport not in ("u1", "t1"):
            raise ValueError(f"transport must be 'u1' or 't1', not {self.transport!r}")
        self.scenario = Path(self.scenario).resolve()
        self.workdir = Path(self.workdir).resolve()

    @property
    def message_log(self) -> Path:
        return self.workdir / "messages.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "errors.log"

    @property
    def output_log(self) -> Path:
        return self.workdir / "sipp.out"

    @property
    def uri(self) -> str:
        """Registrar URI for a client, e.g. ``sip:127.0.0.1:5070`` (``;transport=tcp``)."""
        suffix = ";transport=tcp" if self.transport == "t1" else ""
        return f"sip:{self.host}:{self.port}{suffix}"

    def command(self) -> list[str]:
        cmd = [
            self.sipp_bin,
            "-sf",
            str(self.scenario),
            "-i",
            self.host,
            "-p",
            str(self.port),
            "-t",
            self.transport,
            "-ci",
            self.host,  # the control socket (UDP 8888+) would bind 0.0.0.0 otherwise
            "-m",
            str(self.calls),
            "-nd",
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(self.message_log),
            "-trace_err",
            "-error_file",
            str(self.error_log),
        ]
        for name, value in self.variables.items():
            cmd += ["-set", name, str(value)]
        if self.timeout is not None:
            cmd += ["-timeout", f"{round(self.timeout * 1000)}ms", "-timeout_error"]
        if self.service is not None:
            cmd += ["-s", self.service]
        cmd += list(self.extra_args)
        if self.remote is not None:
            cmd.append(self.remote)
        return cmd

    def start(self, wait: float = 10.0) -> None:
        """Start SIPp and return once its SIP port is bound (raises if it exits)."""
        if self.proc is not None:
            raise RuntimeError("SIPp already started")
        if shutil.which(self.sipp_bin) is None:
            raise RuntimeError("sipp is not installed: apt-get install sip-tester")
        if not self.scenario.is_file():
            raise FileNotFoundError(self.scenario)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.message_log, self.error_log):
            path.unlink(missing_ok=True)  # SIPp appends to the error file
        self.returncode = None
        env = dict(os.environ, TZ="UTC")  # trace timestamps are local time
        with open(self.output_log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                self.returncode = code
                if code == 0:
                    return  # a short client scenario may finish before we look
                raise RuntimeError(f"sipp exited at start (rc={code}):\n{self.output()[-3000:]}")
            if _bound_inodes(self.port, self.transport == "t1") & socket_inodes(self.proc.pid):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sipp did not bind {HOST}:{self.port}:\n{self.output()[-3000:]}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for SIPp to exit by itself (e.g. with ``timeout``); its exit code."""
        if self.proc is None:
            if self.returncode is None:
                raise RuntimeError("SIPp not started")
            return self.returncode
        code = self.proc.wait(timeout)
        self.returncode = code
        self.proc = None
        return code

    def stop(self) -> int | None:
        """Stop SIPp (SIGTERM, then SIGKILL); safe to call twice.  The exit code."""
        if self.proc is None:
            return self.returncode
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.returncode = proc.wait()
        return self.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def output(self) -> str:
        """SIPp's stdout/stderr (its final screens are written when it exits)."""
        return self.output_log.read_text(errors="replace") if self.output_log.exists() else ""

    def errors(self) -> str:
        """The ``-trace_err`` file (note: scenarios using verifyauth log a harmless
        "verifyAuthHeader: authentication must be digest" for each REGISTER without
        Authorization)."""
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def messages(self) -> list[SipMessage]:
        """Every SIP message in the trace so far, in order."""
        return parse_message_log(self.message_log)

    def received_requests(self, method: str | None = "REGISTER") -> list[SipMessage]:
        """Requests SIPp received (only ``method`` unless None)."""
        return [
            m
            for m in self.messages()
            if m.direction == "received" and m.is_request and (method is None or m.method == method.upper())
        ]

    def sent_responses(self, code: int | None = None) -> list[SipMessage]:
        """Responses SIPp sent (only status ``code`` unless None)."""
        return [
            m
            for m in self.messages()
            if m.direction == "sent" and not m.is_request and (code is None or m.status_code == code)
        ]

    def received_responses(self, code: int | None = None) -> list[SipMessage]:
        """Responses SIPp received (only status ``code`` unless None)."""
        return [
            m
            for m in self.messages()
            if m.direction == "received" and not m.is_request and (code is None or m.status_code == code)
        ]

    def sent_requests(self, method: str | None = None) -> list[SipMessage]:
        """Requests SIPp sent (only ``method`` unless None)."""
        return [
            m
            for m in self.messages()
            if m.direction == "sent" and m.is_request and (method is None or m.method == method.upper())
        ]
