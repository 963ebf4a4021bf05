"""Run a command and sample the memory of its whole process tree while it runs.

``geoseg segment`` starts Ray locally: the driver (the ``geoseg`` process) spawns the GCS server,
the raylet and its agents, and the raylet spawns the worker processes (read tasks and the model
actor). The peak of the *sum* of their resident set sizes is what a machine must provide.

The sum of RSS counts pages shared between processes (Ray's plasma object store in ``/dev/shm``,
shared libraries) once per process that touches them, so it overstates the real footprint; the
sum of PSS (proportional set size, shared pages split between their users) does not. Both are
kept: RSS every sample, PSS every few samples (reading ``smaps_rollup`` costs more).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide CPU seconds: busy (user, nice, system, irq) and stolen by the hypervisor."""

    busy_s: float
    steal_s: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return cls(busy, getattr(t, "steal", 0.0))

    def since(self, start: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(self.busy_s - start.busy_s, self.steal_s - start.steal_s)


def foreign_cpu_share(machine: CpuSnapshot, own_cpu_s: float, wall_s: float) -> float:
    """Share of the machine's CPU capacity used by *other* processes (and stolen) meanwhile.

    Anything well above zero means the figure was measured on a busy machine.
    """
    cores = psutil.cpu_count() or 1
    foreign = max(0.0, machine.busy_s - own_cpu_s) + machine.steal_s
    return foreign / (wall_s * cores)


def wait_for_quiet(
    max_wait_s: float, threshold: float = 0.15, window_s: float = 3.0, windows: int = 2
) -> tuple[float, float]:
    """Wait until the machine's CPU is at most ``threshold`` busy for ``windows`` windows in a row.

    The machine may be shared (other users' processes, possibly invisible from this namespace,
    still show in the machine-wide CPU counters). Gives up after ``max_wait_s``. Returns the
    seconds waited and the busy share of the last window.
    """
    cores = psutil.cpu_count() or 1
    start = time.perf_counter()
    quiet = 0
    share = 0.0
    while True:
        before = CpuSnapshot.now()
        time.sleep(window_s)
        used = CpuSnapshot.now().since(before)
        share = (used.busy_s + used.steal_s) / (window_s * cores)
        quiet = quiet + 1 if share <= threshold else 0
        waited = time.perf_counter() - start
        if quiet >= windows or waited >= max_wait_s:
            return waited, share


@dataclass
class TreeStats:
    """Peaks observed over the life of a process tree."""

    samples: int = 0
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    peak_driver_rss: int = 0
    peak_driver_pss: int = 0
    peak_driver_uss: int = 0
    peak_procs: int = 0
    # The tree's processes (pid, name, RSS) at the sample where the tree's RSS peaked.
    at_peak: list[dict[str, Any]] = field(default_factory=list)
    # (seconds since start, tree RSS, driver RSS) of every sample.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    # Last seen user+system CPU seconds per pid (a process's CPU time only grows).
    cpu_s_by_pid: dict[int, float] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        """CPU seconds used by the tree (as last seen for each process; a lower bound)."""
        return sum(self.cpu_s_by_pid.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["cpu_s_by_pid"], data["timeline"]
        data["cpu_s"] = self.cpu_s
        return data

    def write_timeline(self, path: Path) -> None:
        """The samples as CSV: ``t_s,tree_rss_mib,driver_rss_mib``."""
        lines = ["t_s,tree_rss_mib,driver_rss_mib"]
        lines += [f"{t:.2f},{tree / 2**20:.1f},{drv / 2**20:.1f}" for t, tree, drv in self.timeline]
        path.write_text("\n".join(lines) + "\n")


class TreeSampler(threading.Thread):
    """Background thread: every ``interval`` seconds, sum RSS over ``pid`` and its descendants."""

    def __init__(
        self,
        pid: int,
        interval: float = 0.2,
        pss_every: int = 5,
        limit_bytes: int | None = None,
        min_available_bytes: int = 2 * 2**30,
    ) -> None:
        super().__init__(daemon=True, name=f"tree-sampler-{pid}")
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.limit_bytes = limit_bytes
        self.min_available_bytes = min_available_bytes
        self.stats = TreeStats()
        # Set when the tree's RSS passed limit_bytes or the machine ran low on memory: the run
        # is stopped so that a runaway process cannot take a shared machine down.
        self.over_limit = threading.Event()
        self._stop_event = threading.Event()
        self._procs: dict[int, psutil.Process] = {pid: self.root}
        self._start = time.perf_counter()

    def stop(self) -> TreeStats:
        self._stop_event.set()
        self.join()
        return self.stats

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def _tree(self) -> list[psutil.Process]:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return []
        procs = [self.root]
        for child in children:
            # Keep one Process object per pid: it remembers the start time, so a reused pid is
            # never mistaken for the process that had it.
            procs.append(self._procs.setdefault(child.pid, child))
        return procs

    def sample(self) -> None:
        """Take one sample of the tree (processes that vanish meanwhile are skipped)."""
        stats = self.stats
        with_pss = stats.samples % self.pss_every == 0
        total_rss = total_pss = driver_rss = 0
        seen: list[dict[str, Any]] = []
        procs = self._tree()
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    name = proc.name()
                full = proc.memory_full_info() if with_pss else None
            except psutil.Error:
                continue
            total_rss += rss
            seen.append({"pid": proc.pid, "name": name, "rss": rss})
            stats.cpu_s_by_pid[proc.pid] = cpu.user + cpu.system
            if full is not None:
                total_pss += full.pss
            if proc.pid == self.root.pid:
                driver_rss = rss
                stats.peak_driver_rss = max(stats.peak_driver_rss, rss)
                if full is not None:
                    stats.peak_driver_pss = max(stats.peak_driver_pss, full.pss)
                    stats.peak_driver_uss = max(stats.peak_driver_uss, full.uss)
        stats.samples += 1
        stats.timeline.append((time.perf_counter() - self._start, total_rss, driver_rss))
        stats.peak_procs = max(stats.peak_procs, len(procs))
        stats.peak_tree_pss = max(stats.peak_tree_pss, total_pss)
        if total_rss > stats.peak_tree_rss:
            stats.peak_tree_rss = total_rss
            stats.at_peak = sorted(seen, key=lambda p: -int(p["rss"]))
        too_big = self.limit_bytes is not None and total_rss > self.limit_bytes
        if too_big or psutil.virtual_memory().available < self.min_available_bytes:
            self.over_limit.set()


@dataclass
class MonitoredRun:
    """Outcome of :func:`run_monitored`."""

    command: list[str]
    returncode: int | None
    wall_s: float
    timed_out: bool
    tree: TreeStats
    machine_cpu: CpuSnapshot
    stopped_for_memory: bool = False

    @property
    def foreign_cpu_share(self) -> float:
        return foreign_cpu_share(self.machine_cpu, self.tree.cpu_s, self.wall_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "returncode": self.returncode,
            "wall_s": self.wall_s,
            "timed_out": self.timed_out,
            "stopped_for_memory": self.stopped_for_memory,
            "tree": self.tree.to_json(),
            "machine_busy_cpu_s": self.machine_cpu.busy_s,
            "machine_steal_cpu_s": self.machine_cpu.steal_s,
            "foreign_cpu_share": self.foreign_cpu_share,
        }


def _terminate_tree(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGINT the driver (Ray shuts its processes down), then kill what is left, by pid."""
    try:
        root = psutil.Process(proc.pid)
        descendants = root.children(recursive=True)
    except psutil.Error:
        descendants = []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


def run_monitored(
    command: list[str],
    log_path: Path,
    timeout_s: float | None = None,
    interval_s: float = 0.2,
    env: dict[str, str] | None = None,
    limit_bytes: int | None = None,
) -> MonitoredRun:
    """Run ``command`` (stdout and stderr to ``log_path``), sampling its tree's memory.

    ``wall_s`` is the honest wall clock from spawning the process to its exit. The run is stopped
    after ``timeout_s``, or when its tree's RSS passes ``limit_bytes`` or the machine's available
    memory drops below 2 GiB.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        cpu_start = CpuSnapshot.now()
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        sampler = TreeSampler(proc.pid, interval_s, limit_bytes=limit_bytes)
        sampler.start()
        timed_out = over_limit = False
        deadline = None if timeout_s is None else start + timeout_s
        try:
            while proc.poll() is None:
                if sampler.over_limit.wait(0.5):
                    over_limit = True
                    _terminate_tree(proc)
                elif deadline is not None and time.perf_counter() > deadline:
                    timed_out = True
                    _terminate_tree(proc)
        except BaseException:
            _terminate_tree(proc)
            raise
        finally:
            wall_s = time.perf_counter() - start
            machine = CpuSnapshot.now().since(cpu_start)
            stats = sampler.stop()
    return MonitoredRun(command, proc.returncode, wall_s, timed_out, stats, machine, over_limit)
