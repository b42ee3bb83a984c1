"""Measure a process tree on Linux from ``/proc`` (stdlib only).

* :func:`tree_pids`: a process and all its descendants.
* :func:`pss_rss_kib`: summed Pss and Rss (``/proc/PID/smaps_rollup``).
* :func:`cpu_ns`: summed on-CPU time in nanoseconds (``/proc/PID/task/TID/schedstat``).
* :func:`cpu_by_process`: the same per process, keyed by (pid, start time), for callers that
  split a tree's CPU by process; :func:`start_time` and :func:`process_name` name them.
* :class:`CpuSampler` / :func:`sample`: CPU share of a set of processes over an interval,
  in percent of one core.

Why schedstat, and why per thread
---------------------------------
``/proc/PID/stat`` gives utime/stime in clock ticks (10 ms at ``CLK_TCK`` = 100): one tick
over 60 s is already 0.017 % of a core, too coarse for figures around 0.01 %. The first
field of ``schedstat`` is ``sum_exec_runtime`` in nanoseconds (needs ``CONFIG_SCHED_INFO``,
present on the usual distribution kernels).

``/proc/PID/schedstat`` is *not* a per-process total: it is the schedstat of the task the
PID names, i.e. the thread-group leader (main thread) only. Measured on kernel 6.18 with a
Python process whose two extra threads spun for ~1 s while the main thread slept:
``/proc/PID/schedstat`` said 0.04 s, the three ``/proc/PID/task/*/schedstat`` summed to
1.18 s (matching utime+stime of 122 ticks in ``/proc/PID/stat``). So :func:`cpu_ns` sums
``/proc/PID/task/*/schedstat`` over all live threads of each process. Threads that have
already exited are not counted (the kernel folds their time into the process's signal
struct, visible only in tick precision through ``/proc/PID/stat``); for the single-threaded
Kamailio processes this does not arise, and :class:`CpuSampler` never lets a process's
figure go below its starting value.

Processes can vanish at any moment while ``/proc`` is read: every reader here treats a
missing or unreadable entry as "that process is gone" and skips it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "CpuSampler",
    "cpu_by_process",
    "cpu_ns",
    "process_name",
    "pss_rss_kib",
    "sample",
    "start_time",
    "stop_processes",
    "tree_pids",
]

PROC = Path("/proc")

#: Reading /proc of a process that went away raises FileNotFoundError or ProcessLookupError
#: (ESRCH), one we may not read PermissionError: all OSError, all meaning "skip it".
_GONE = OSError


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after ``comm`` (field 3 = state is index 0), or None if gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except _GONE:
        return None
    # comm (field 2) is in parentheses and may itself contain spaces and ')': split at the last ')'.
    _, sep, rest = raw.rpartition(b")")
    if not sep:
        return None
    return rest.decode("ascii", "replace").split()


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 2:
        return None
    return int(fields[1])  # field 4


def _starttime(pid: int) -> int | None:
    """Start time of the process in clock ticks since boot (field 22): tells a reused PID apart."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it is gone.

    (pid, start time) names one process for good: a PID the kernel reuses gets another start time.
    """
    return _starttime(pid)


def process_name(pid: int) -> str | None:
    """The process's name as ``ps -o comm`` shows it (``/proc/PID/comm``), or None when it is gone."""
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except _GONE:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants (children, grandchildren, ...), root first.

    Built from the parent PID in every ``/proc/*/stat``; processes that vanish during the
    walk are skipped. Returns ``[]`` when ``root_pid`` itself does not exist.
    """
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        ppid = _ppid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    if not (PROC / str(root_pid)).exists():
        return []
    out: list[int] = []
    seen: set[int] = set()
    todo = [root_pid]
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return out


def _rollup_kib(pid: int) -> tuple[int, int] | None:
    """(Pss, Rss) in KiB from ``/proc/PID/smaps_rollup``, or None when the process is gone."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except _GONE:
        return None
    pss = rss = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            pss = int(value.split()[0])
        elif key == "Rss":
            rss = int(value.split()[0])
    return pss, rss


def pss_rss_kib(pids: Iterable[int]) -> tuple[int, int]:
    """Summed (Pss, Rss) in KiB of ``pids`` from ``/proc/PID/smaps_rollup``; vanished pids are skipped.

    Pss divides every shared page among the processes mapping it, so the Pss sum is the
    tree's real footprint; the Rss sum counts shared pages (e.g. Kamailio's shared memory
    segment and libraries) once per process and overstates it.
    """
    pss = rss = 0
    for pid in pids:
        got = _rollup_kib(pid)
        if got is not None:
            pss += got[0]
            rss += got[1]
    return pss, rss


def _read_schedstat_ns(path: Path) -> int | None:
    try:
        first = path.read_text().split(maxsplit=1)[0]
    except (_GONE, IndexError):
        return None
    return int(first)


def _process_cpu_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of all live threads of ``pid``, or None when the process is gone."""
    task_dir = PROC / str(pid) / "task"
    try:
        tids = os.listdir(task_dir)
    except _GONE:
        return None
    total = 0
    found = False
    for tid in tids:
        ns = _read_schedstat_ns(task_dir / tid / "schedstat")
        if ns is not None:  # a thread may exit between listdir and read
            total += ns
            found = True
    return total if found else None


def cpu_ns(pids: Iterable[int]) -> int:
    """Summed on-CPU time in nanoseconds of ``pids`` (every live thread of each), vanished pids skipped.

    Uses the first field of ``/proc/PID/task/TID/schedstat`` (``sum_exec_runtime``);
    ``/proc/PID/schedstat`` alone would count the main thread only (see the module docstring).
    """
    total = 0
    for pid in pids:
        ns = _process_cpu_ns(pid)
        if ns is not None:
            total += ns
    return total


def cpu_by_process(pids: Iterable[int]) -> dict[tuple[int, int], int]:
    """On-CPU nanoseconds of each process of ``pids`` that still runs, keyed by (pid, :func:`start_time`).

    Every live thread counted, as in :func:`cpu_ns`; vanished pids are left out.
    """
    out: dict[tuple[int, int], int] = {}
    for pid in set(pids):
        start = _starttime(pid)
        ns = _process_cpu_ns(pid)
        if start is not None and ns is not None:
            out[(pid, start)] = ns
    return out


PidsFn = Callable[[], Iterable[int]]


class CpuSampler:
    """CPU share, in percent of one core, of the processes ``pids_fn()`` lists.

    ``pids_fn`` is called at :meth:`start` and again at :meth:`stop` (e.g.
    ``lambda: tree_pids(root)``), so the set may change in between:

    * a process listed at both ends is counted for its CPU time between the two reads;
    * a process that exits in between is ignored entirely (its CPU time in the interval
      is lost, since its ``/proc`` entry is gone at the end);
    * a process that appears in between is counted from zero, i.e. with all the CPU time
      it has used since it started (all of it inside the interval);
    * a PID that was reused by a new process (different start time) counts as a new one.

    The result is (sum of per-process on-CPU nanoseconds) / (wall-clock nanoseconds of the
    interval, ``time.monotonic_ns``) x 100, so 100.0 is one full core and a multi-threaded
    or multi-process tree can exceed it.
    """

    def __init__(self, pids_fn: PidsFn) -> None:
        self._pids_fn = pids_fn
        self._t0: int | None = None
        self._start: dict[tuple[int, int], int] = {}

    def _snapshot(self) -> dict[tuple[int, int], int]:
        return cpu_by_process(self._pids_fn())

    def start(self) -> None:
        """Begin an interval: list the processes and read their CPU time."""
        self._start = self._snapshot()
        self._t0 = time.monotonic_ns()

    def stop(self) -> float:
        """End the interval begun by :meth:`start` and return the CPU share in percent of one core."""
        return self.stop_detail()[0]

    def stop_detail(self) -> tuple[float, int, int]:
        """Like :meth:`stop`, returning (percent of one core, on-CPU ns, wall-clock ns)."""
        if self._t0 is None:
            raise RuntimeError("CpuSampler.stop() before start()")
        end = self._snapshot()
        wall_ns = time.monotonic_ns() - self._t0
        self._t0 = None
        used = 0
        for key, ns in end.items():
            used += max(0, ns - self._start.get(key, 0))
        return (100.0 * used / wall_ns if wall_ns > 0 else 0.0), used, wall_ns

    def sample(self, seconds: float) -> float:
        """:meth:`start`, sleep ``seconds``, :meth:`stop`."""
        self.start()
        time.sleep(seconds)
        return self.stop()


def sample(pids_fn: PidsFn, seconds: float) -> float:
    """CPU share, in percent of one core, of ``pids_fn()`` over the next ``seconds`` (see :class:`CpuSampler`)."""
    return CpuSampler(pids_fn).sample(seconds)


def stop_processes(known: Mapping[int, int], grace: float = 5.0) -> int:
    """SIGKILL those of ``known`` (pid -> start time) still running after ``grace`` s; return how many."""
    deadline = time.monotonic() + grace
    alive = dict(known)
    while alive and time.monotonic() < deadline:
        alive = {pid: st for pid, st in alive.items() if start_time(pid) == st}
        if alive:
            time.sleep(0.1)
    killed = 0
    for pid, st in alive.items():
        if start_time(pid) == st:  # still the process we saw, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
