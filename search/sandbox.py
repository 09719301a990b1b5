"""Code sandbox: runs model-written Python programs in isolation, fast.

How it works. `Sandbox` starts warm worker processes, each inside its own bubblewrap (`bwrap`)
container. A worker pre-imports the math stack once, then serves requests over length-prefixed
pipe frames; for every program it forks a child that applies resource limits, runs the program in
a fresh globals dict in a fresh private directory, and reports. Forking a warm interpreter costs
a few milliseconds of CPU, where starting one costs tens, which is what makes thousands of
executions per tree search affordable. Programs that mention sympy or numpy go to workers that
pre-imported them; the rest go to lean workers, because fork cost grows with the size of the
forked process.

What is covered (isolation="bwrap"):
- Fresh state per program: each program runs in its own forked process and scratch directory;
  after it ends the worker kills every process left in its PID namespace and wipes `/tmp`
  (all but the mount points of the installation, should it live under the host's /tmp), so
  globals, patched modules, files and stray processes never reach the next program. A worker
  that cannot clean up (an undeletable file, a SysV IPC object left behind) is replaced.
- Limits: wall-clock timeout (enforced by the worker), CPU time (RLIMIT_CPU), address space
  (RLIMIT_AS), file size (RLIMIT_FSIZE), processes and threads (RLIMIT_NPROC; when the host runs
  as root the worker drops to uid 65534 first, since the kernel does not enforce that limit for
  root), no core dumps, stdout capped while it is read.
- Namespaces: user, PID, network (loopback only: no network, no DNS), IPC, UTS, cgroup and mount.
  The filesystem holds only read-only binds of /usr, the Python installation and the host's
  site-packages, the loader cache, a fresh /proc, a minimal read-only /dev (its /dev/shm too, so
  no POSIX shared memory or multiprocessing locks) and a size-capped tmpfs at /tmp (the only writable place, whether or not
  the host runs as root). The host's /tmp, home directory and the rest of /etc are not
  there (except, read-only, those of the directories above that lie under them).
- Environment: cleared; only PATH, HOME, TMPDIR, LANG and thread-count variables are set.
- A small seccomp filter refuses creating or joining namespaces (unshare, setns, clone with
  CLONE_NEWUSER), so programs cannot build their own user namespace to widen the kernel surface.
- A second filter, installed in each program's process, keeps the program away from its worker
  (which runs under the same uid): no signals to the worker, the namespace's init or a process
  group (kill, tkill, tgkill, rt_sigqueueinfo, pidfds; nor, through file ownership, fcntl F_SETOWN
  and ioctl FIOSETOWN, the kernel's SIGIO), no limits, priority or scheduling set on
  another process (prlimit64, setpriority, sched_set*), no sockets but Unix, IPv4, IPv6 and
  netlink (AF_VSOCK reached the hypervisor's port space), and none of the kernel objects that
  outlive a process (POSIX message queues, keyrings, memfds).
- Children and threads die with the program: when it ends or times out, everything else in the
  worker's PID namespace is killed. A program that kills its worker gets an error result and the
  worker is replaced transparently.

What is NOT covered: a general seccomp syscall filter (any other syscall the kernel allows an
unprivileged user is available); kernel or bwrap exploits; fair CPU sharing (no cgroups: a
program may use every core until its time limit); side channels (timing, caches, host-wide
/proc files such as /proc/cpuinfo and /proc/meminfo); memory adds up across a program's
processes (the limit is per process) and its /tmp files (up to `tmp_mb`), and memory the kernel
spends on its behalf (page tables, pipe buffers, the inodes of many empty /tmp entries) is not
limited at all, since there are no cgroups; everything under /usr
and the Python installation is readable. isolation="none" (for machines without user
namespaces) keeps only the per-program process, rlimits, timeout and a private scratch
directory: it is NOT a security boundary.

Failing loudly: if bwrap is missing or cannot create namespaces, `Sandbox()` raises
`SandboxUnavailable` saying how to fix it; it never falls back to weaker isolation by itself.
"""

from __future__ import annotations

import builtins
import gc
import io
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

# Host-only modules (subprocess, threading, queue, tempfile, ...) are imported where they are
# used: the worker runs this very file, and every module it loads makes each fork dearer
# (threading alone adds ~100 page faults per child through its at-fork hooks).
if TYPE_CHECKING:
    import subprocess

_FRAME_HEADER = struct.Struct("!I")
_WORKER_FLAG = "--kaizen-sandbox-worker"
_WORKER_START_TIMEOUT_S = 120.0
# Extra seconds the host waits beyond the program timeout before it declares a worker hung.
_WORKER_GRACE_S = 10.0
# Programs whose source mentions one of these go to workers that pre-imported them.
_HEAVY_MODULES = ("sympy", "numpy")
_LIGHT_PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
                  "statistics", "random", "re", "string", "heapq", "bisect")
_HEAVY_PRELOAD = _LIGHT_PRELOAD + _HEAVY_MODULES
# Run once in a worker before it forks anything. sympy does much of its set-up lazily, on first
# use of a function, and every child would otherwise repeat it: factor() costs ~29 ms of CPU in a
# cold child and ~7 ms in a warm one, solve() ~38 ms and ~12 ms.
_WARM_UP = {
    "sympy": """
from sympy import *
x, y, n = symbols('x y n')
factor(x**2 - 1); expand((x + y)**3); cancel((x**2 - 1) / (x - 1)); apart(1 / (x * (x + 1)))
together(1 / x + 1 / y); trigsimp(sin(x)**2 + cos(x)**2); simplify(sqrt(8) / sqrt(2))
solve(x**2 - 4, x); solve([x + y - 3, x - y - 1], [x, y]); solveset(x**2 - 1, x, S.Reals)
roots(Poly(x**2 - 3*x + 2, x)); Poly(x**3 + 1, x).all_coeffs(); nsolve(x**2 - 2, x, 1)
Rational(1, 3) + Rational(1, 6); N(pi, 10); sqrt(8).evalf(); Abs(-x); floor(Rational(7, 2))
integrate(x**2, (x, 0, 1)); diff(sin(x) * exp(x), x); limit(sin(x) / x, x, 0)
summation(n**2, (n, 1, 10)); series(exp(x), x, 0, 4); nsimplify(0.5); log(8, 2)
Matrix([[1, 2], [3, 4]]).det(); Matrix([[1, 2], [3, 4]]).inv(); Eq(x, 1)
binomial(10, 3); factorial(5); gcd(12, 18); lcm(4, 6); isprime(97); factorint(360)
divisors(36); primefactors(84); totient(36); mod_inverse(3, 7); latex(x**2)
""",
}
# Inside the sandbox the program runs as this uid when the host is root (see module docstring).
_UNPRIVILEGED_ID = 65534
_ERROR_TEXT_LIMIT = 2000
_STDERR_TAIL_BYTES = 4096
_TRUNCATION_MARKER = "\n[output truncated: more than {limit} bytes]"
_FIX_HINT = ("install bubblewrap (`apt-get install bubblewrap`) and make sure user namespaces are "
             "enabled, or pass isolation='none' explicitly (unsafe: no isolation)")


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine, or a worker failed to start."""


class SandboxSetupError(SandboxUnavailable):
    """This machine lacks what the isolation needs (bubblewrap, a seccomp syscall table): trying again cannot help."""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program."""

    ok: bool
    stdout: str
    error: str | None
    timed_out: bool = False
    memory_exceeded: bool = False

    @classmethod
    def failure(cls, error: str) -> ExecResult:
        """A program that did not run (or whose worker died under it)."""
        return cls(ok=False, stdout="", error=error)

    def to_json(self) -> dict:
        return {"ok": self.ok, "stdout": self.stdout, "error": self.error,
                "timed_out": self.timed_out, "memory_exceeded": self.memory_exceeded}


SANDBOX_PLACEMENT_FIELDS = ("workers",)
"""SandboxConfig fields that say how fast programs run, not what they may do or print."""


@dataclass
class SandboxConfig:
    """Limits and worker settings of a `Sandbox`."""

    timeout_s: float = field(default=5.0, metadata={
        "help": "wall-clock limit per program in seconds; CPU time (all threads together) is "
                "capped at the next whole second above it"})
    memory_mb: int = field(default=512, metadata={
        "help": "address space a program may add on top of the preloaded interpreter (MiB)"})
    max_output_bytes: int = field(default=64_000, metadata={
        "help": "stdout kept per program; the rest is discarded and a marker appended"})
    max_program_bytes: int = field(default=1_000_000, metadata={
        "help": "largest accepted program source (UTF-8 bytes)"})
    max_processes: int = field(default=16, metadata={
        "help": "processes plus threads a program may have at once, itself included (each thread's "
                "stack also counts against memory_mb: at 512 MiB about 7 threads start)"})
    max_file_bytes: int = field(default=16_000_000, metadata={
        "help": "largest file a program may write (bytes)"})
    tmp_mb: int = field(default=64, metadata={
        "help": "size of the private /tmp of each worker (tmpfs, held in RAM; bwrap only)"})
    workers: int = field(default=2, metadata={
        "help": "programs run in parallel (one warm worker each, per preload set)"})
    isolation: str = field(default="bwrap", metadata={
        "help": "'bwrap' (namespaces, see module docstring) or 'none' (UNSAFE: limits only, for "
                "machines without user namespaces; must be chosen explicitly)"})

    def __post_init__(self) -> None:
        if self.isolation not in ("bwrap", "none"):
            raise ValueError(f"isolation must be 'bwrap' or 'none', not {self.isolation!r}")
        if not 0 < self.timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a positive number, not {self.timeout_s!r}")
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{spec.name} must be a positive integer, not {value!r}")


# ---------------------------------------------------------------------------------------------
# Host side


class Sandbox:
    """Pool of isolated warm workers. Thread-safe; use as a context manager or call `close()`."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._launcher = _Launcher(self.config)  # raises SandboxUnavailable if it cannot work
        self._closed = False
        self._pools = {preload: _WorkerPool(self._launcher, preload, self.config.workers)
                       for preload in (_LIGHT_PRELOAD, _HEAVY_PRELOAD)}
        # Workers go with the sandbox even if it is dropped without close().
        self._shut_down = weakref.finalize(self, _shut_down, list(self._pools.values()),
                                           self._launcher)
        # Start the lean workers now so a broken setup fails here, loudly; heavy ones on demand.
        self._pools[_LIGHT_PRELOAD].start()

    def run(self, code: str) -> ExecResult:
        """Run one program; never raises for anything the program does."""
        return self.run_many([code])[0]

    def run_many(self, programs: Sequence[str]) -> list[ExecResult]:
        """Run programs on all free workers in parallel; results come back in input order."""
        if self._closed:
            raise RuntimeError("sandbox is closed")
        results: list[ExecResult | None] = [None] * len(programs)
        waiting: dict[_WorkerPool, deque[int]] = {pool: deque() for pool in self._pools.values()}
        for index, code in enumerate(programs):
            results[index] = _rejection(code, self.config)
            if results[index] is None:
                waiting[self._pools[_preload_for(code)]].append(index)
        payloads = {index: programs[index].encode("utf-8")
                    for queued in waiting.values() for index in queued}
        _Batch(payloads, waiting, results, self.config.timeout_s + _WORKER_GRACE_S).run()
        return results  # type: ignore[return-value]  # every slot is filled by now

    def close(self) -> None:
        """Stop every worker and everything running inside it."""
        self._closed = True
        self._shut_down()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shut_down(pools: list[_WorkerPool], launcher: _Launcher) -> None:
    for pool in pools:
        pool.close()
    launcher.close()


def _rejection(code: str, config: SandboxConfig) -> ExecResult | None:
    """The error result for a program that must not be run at all, or None if it may run."""
    if not isinstance(code, str):
        raise TypeError(f"program must be str, not {type(code).__name__}")
    if not code.strip():
        return ExecResult.failure("empty program")
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return ExecResult.failure(
            f"program is not valid UTF-8: {exc.reason} at position {exc.start}")
    if size > config.max_program_bytes:
        return ExecResult.failure(
            f"program too large: {size} bytes (limit {config.max_program_bytes})")
    return None


def _preload_for(code: str) -> tuple[str, ...]:
    return _HEAVY_PRELOAD if any(name in code for name in _HEAVY_MODULES) else _LIGHT_PRELOAD


class _WorkerDied(Exception):
    pass


# Requests a worker holds at once: while it runs one program the next is already in its pipe, so
# it never waits for the host to wake up.
_PIPELINE_DEPTH = 2


class _Batch:
    """One `run_many` call: feeds its programs to the workers it holds and collects replies."""

    def __init__(self, payloads: dict[int, bytes], waiting: dict[_WorkerPool, deque[int]],
                 results: list[ExecResult | None], answer_within_s: float) -> None:
        self._payloads = payloads
        self._waiting = waiting
        self._results = results
        self._answer_within_s = answer_within_s
        self._held: list[_WorkerSlot] = []

    def run(self) -> None:
        try:
            while any(self._waiting.values()) or self._held:
                self._acquire()
                for slot in self._held:
                    self._feed(slot)
                self._collect()
                self._release_idle()
        finally:
            for slot in self._held:  # only after an exception
                if slot.in_flight:
                    slot.kill()  # its replies would reach the next user of the worker
                slot.pool.release(slot)

    def _acquire(self) -> None:
        for pool, queued in self._waiting.items():
            mine = sum(slot.pool is pool for slot in self._held)
            # Block only when there is nothing else to do; otherwise take what is free now.
            block = not self._held
            while queued and mine * _PIPELINE_DEPTH < len(queued):
                slot = pool.acquire(block=block)
                if slot is None:
                    break
                self._held.append(slot)
                mine, block = mine + 1, False

    def _feed(self, slot: _WorkerSlot) -> None:
        queued = self._waiting[slot.pool]
        while queued and len(slot.in_flight) < _PIPELINE_DEPTH:
            index = queued.popleft()
            slot.send(index, self._payloads[index])

    def _collect(self) -> None:
        busy = {slot.reply_fd: slot for slot in self._held if slot.in_flight}
        if not busy:
            return
        now = time.monotonic()
        deadline = min(slot.head_started + self._answer_within_s for slot in busy.values())
        poller = select.poll()
        for fd, slot in busy.items():
            poller.register(fd, select.POLLIN)
            if slot.unsent:
                poller.register(slot.request_fd, select.POLLOUT)
        writers = {slot.request_fd: slot for slot in busy.values() if slot.unsent}
        for fd, _ in poller.poll(max(0.0, deadline - now) * 1000):
            slot = writers.get(fd) or busy[fd]
            if slot.process_gone:
                continue  # lost earlier in this round
            try:
                if fd in writers:
                    slot.flush()
                else:
                    for index, result in slot.receive():
                        self._results[index] = result
            except _WorkerDied as exc:
                self._lose_worker(slot, str(exc))
            if slot.retiring:
                self._waiting[slot.pool].extendleft(reversed(slot.in_flight))
                slot.kill()
        now = time.monotonic()
        for slot in busy.values():
            if slot.in_flight and now > slot.head_started + self._answer_within_s:
                self._lose_worker(slot, "did not answer in time")

    def _lose_worker(self, slot: _WorkerSlot, why: str) -> None:
        """The program being run when a worker died gets the blame; the ones queued behind it
        are given to the next worker."""
        in_flight = list(slot.in_flight)
        slot.kill()
        if in_flight:
            self._results[in_flight[0]] = ExecResult.failure(
                f"sandbox worker {why} while running the program; it was restarted")
            self._waiting[slot.pool].extendleft(reversed(in_flight[1:]))

    def _release_idle(self) -> None:
        for slot in [slot for slot in self._held if not slot.in_flight]:
            if not self._waiting[slot.pool]:
                self._held.remove(slot)
                slot.pool.release(slot)


class _WorkerPool:
    """`size` interchangeable workers with the same preload set; a queue hands them out."""

    def __init__(self, launcher: _Launcher, preload: tuple[str, ...], size: int) -> None:
        import queue
        import threading

        self._slots = [_WorkerSlot(self, launcher, preload) for _ in range(size)]
        self._idle: queue.SimpleQueue[_WorkerSlot] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._started = False
        for slot in self._slots:
            self._idle.put(slot)

    def start(self) -> None:
        """Start all workers at once (in parallel: each takes a fraction of a second)."""
        import threading

        with self._start_lock:
            if self._started:
                return
            errors: list[SandboxUnavailable] = []

            def start_one(slot: _WorkerSlot) -> None:
                try:
                    slot.ensure_started()
                except SandboxUnavailable as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=start_one, args=(slot,)) for slot in self._slots]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                for slot in self._slots:
                    slot.kill()
                raise errors[0]
            self._started = True

    def acquire(self, *, block: bool) -> _WorkerSlot | None:
        import queue

        self.start()
        try:
            return self._idle.get(block=block)
        except queue.Empty:
            return None

    def release(self, slot: _WorkerSlot) -> None:
        self._idle.put(slot)

    def close(self) -> None:
        for slot in self._slots:
            slot.stop()


class _WorkerSlot:
    """One worker process, (re)started on demand, and the requests it owes replies for."""

    def __init__(self, pool: _WorkerPool, launcher: _Launcher, preload: tuple[str, ...]) -> None:
        self.pool = pool
        self._launcher = launcher
        self._preload = preload
        self._process: subprocess.Popen | None = None
        self._host_scratch: str | None = None
        self._stopped = False
        self._unread = bytearray()
        self._outgoing = bytearray()
        self.in_flight: deque[int] = deque()
        self.retiring = False
        self.head_started = 0.0  # when the worker began the oldest request in flight

    @property
    def reply_fd(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        return self._process.stdout.fileno()

    @property
    def request_fd(self) -> int:
        assert self._process is not None and self._process.stdin is not None
        return self._process.stdin.fileno()

    @property
    def process_gone(self) -> bool:
        return self._process is None

    @property
    def unsent(self) -> bool:
        return bool(self._outgoing)

    def ensure_started(self) -> None:
        if self._stopped:
            raise RuntimeError("sandbox is closed")
        if self._process is None or self._process.poll() is not None:
            self.kill()
            self._process, self._host_scratch = self._launcher.start(self._preload)
            # Requests are written as the pipe takes them, never blocking: a host stuck writing
            # while its worker is stuck writing a reply would wait forever.
            os.set_blocking(self.request_fd, False)

    def send(self, index: int, payload: bytes) -> None:
        """Queue one request and write as much of it as the pipe takes now."""
        if not self.in_flight:
            self.ensure_started()  # replaces a worker that died while idle
            self.head_started = time.monotonic()
        self.in_flight.append(index)
        self._outgoing += _FRAME_HEADER.pack(len(payload)) + payload
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now. A worker that is gone is not reported here: replies it
        sent before it ended (a retiring worker answers, then exits) may still wait in the reply
        pipe, and blaming the oldest request now would throw its answer away. `receive` reads
        them first and reports the death at the end of the pipe, so the blame falls on the first
        request that really went unanswered."""
        try:
            while self._outgoing:
                del self._outgoing[:os.write(self.request_fd, self._outgoing)]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self._outgoing.clear()

    def receive(self) -> list[tuple[int, ExecResult]]:
        """Results that arrived, with the index of their request."""
        chunk = os.read(self.reply_fd, 1 << 20)
        if not chunk:
            raise _WorkerDied("died")
        self._unread += chunk
        replies = []
        while len(self._unread) >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(self._unread)
            end = _FRAME_HEADER.size + size
            if len(self._unread) < end:
                break
            reply = json.loads(self._unread[_FRAME_HEADER.size:end])
            del self._unread[:end]
            # A worker that could not clean up after a program says so and exits; requests
            # queued behind it go elsewhere.
            self.retiring = reply.pop("retire", False)
            replies.append((self.in_flight.popleft(), ExecResult(**reply)))
            self.head_started = time.monotonic()
        return replies

    def kill(self) -> None:
        process, self._process = self._process, None
        self._unread.clear()
        self._outgoing.clear()
        self.in_flight.clear()
        self.retiring = False
        if process is not None:
            _stop_process(process)
        if self._host_scratch is not None:
            shutil.rmtree(self._host_scratch, ignore_errors=True)
            self._host_scratch = None

    def stop(self) -> None:
        self._stopped = True
        self.kill()


class _Spawner:
    """Starts processes from one long-lived thread. bwrap's --die-with-parent follows the
    *thread* that started it, so a worker spawned from a short-lived thread (a start-up helper,
    a caller's pool thread) would be killed when that thread ends."""

    def __init__(self) -> None:
        import queue
        import threading

        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._serve, name="kaizen-sandbox-spawner", daemon=True).start()

    def popen(self, *args: object, **kwargs: object) -> subprocess.Popen:
        from concurrent.futures import Future

        started: Future = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("sandbox is closed")
            self._requests.put((args, kwargs, started))
        return started.result()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._requests.put(None)

    def _serve(self) -> None:
        import subprocess

        while (request := self._requests.get()) is not None:
            args, kwargs, started = request
            try:
                started.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                started.set_exception(exc)


def _stop_process(process: subprocess.Popen) -> None:
    # Killing bwrap kills the sandbox: --die-with-parent ties the namespace's init to it.
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_FRAME_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        if deadline is not None and not _readable(fd, deadline - time.monotonic()):
            raise _WorkerDied("did not answer in time")
        chunk = os.read(fd, size - len(buffer))
        if not chunk:
            raise _WorkerDied("died")
        buffer += chunk
    return bytes(buffer)


def _read_frame(fd: int, deadline: float | None) -> bytes:
    (size,) = _FRAME_HEADER.unpack(_read_exact(fd, _FRAME_HEADER.size, deadline))
    return _read_exact(fd, size, deadline)


class _Launcher:
    """Builds and starts worker processes for one configuration."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._bwrap: str | None = None
        if config.isolation == "bwrap":
            self._bwrap = shutil.which("bwrap")
            if self._bwrap is None:
                raise SandboxSetupError(f"bubblewrap (bwrap) not found on PATH; {_FIX_HINT}")
        self._interpreter = _base_interpreter()
        # The host's third-party directories, exactly (not the base interpreter's own, which a
        # venv does not see either).
        self._site_dirs = [path for path in sys.path if os.path.isdir(path)
                           and os.path.basename(path) in ("site-packages", "dist-packages")]
        with open(__file__, encoding="utf-8") as source:
            self._source = source.read()
        self._spawner = _Spawner()

    def close(self) -> None:
        self._spawner.stop()

    def start(self, preload: tuple[str, ...]) -> tuple[subprocess.Popen, str | None]:
        """A worker that said hello, and its host-side scratch directory (isolation="none"
        only: with bwrap the scratch is a tmpfs that vanishes with the sandbox)."""
        import subprocess
        import tempfile

        scratch = "/tmp" if self._bwrap else tempfile.mkdtemp(prefix="kaizen-sandbox-")
        settings = {
            "preload": list(preload), "site_dirs": self._site_dirs, "scratch_dir": scratch,
            "pid_namespace": self._bwrap is not None,
            "drop_to_id": _UNPRIVILEGED_ID if self._bwrap and os.geteuid() == 0 else None,
            "timeout_s": self.config.timeout_s, "memory_mb": self.config.memory_mb,
            "max_output_bytes": self.config.max_output_bytes,
            "max_processes": self.config.max_processes,
            "max_file_bytes": self.config.max_file_bytes,
        }
        # -I: no PYTHON* variables, user site or program directory; -S: no site-packages but the
        # host's, which the worker adds.
        command = [self._interpreter, "-I", "-S", "-c", self._source, _WORKER_FLAG,
                   json.dumps(settings)]
        errors = tempfile.TemporaryFile()  # a file, not a pipe: nobody has to keep reading it
        try:
            if self._bwrap is None:
                process = self._spawner.popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                    env=_worker_environment(scratch))
            else:
                process = self._start_bwrap(command, errors,
                                            drop_root=settings["drop_to_id"] is not None)
            _handshake(process, errors, hint=_FIX_HINT if self._bwrap else "")
        except SandboxUnavailable:
            if self._bwrap is None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            errors.close()
        return process, None if self._bwrap else scratch

    def _start_bwrap(self, command: list[str], errors: io.BufferedRandom, *,
                     drop_root: bool) -> subprocess.Popen:
        import subprocess

        assert self._bwrap is not None
        seccomp_read, seccomp_write = os.pipe()
        os.write(seccomp_write, _namespace_seccomp_filter())
        os.close(seccomp_write)
        passed = [seccomp_read]
        kept: list[int] = []  # our ends of the handshake pipes
        options = ["--seccomp", str(seccomp_read)]
        if drop_root:
            # bwrap maps only its caller's uid, and the kernel exempts uid 0 from RLIMIT_NPROC.
            # So bwrap waits (userns-block-fd) while we map both root (needed to set up the
            # mounts) and an unprivileged id; the worker switches to the latter before anything.
            info_read, info_write = os.pipe()
            block_read, block_write = os.pipe()
            passed += [info_write, block_read]
            kept += [info_read, block_write]
            options += ["--info-fd", str(info_write), "--userns-block-fd", str(block_read),
                        "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        try:
            process = self._spawner.popen(
                [self._bwrap, *self._bwrap_options(), *options, "--", *command],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, pass_fds=passed)
        except BaseException:
            for fd in kept:
                os.close(fd)
            raise
        finally:
            for fd in passed:
                os.close(fd)
        if drop_root:
            try:
                _map_user_ids(info_read)
                os.write(block_write, b"1")
            except (OSError, ValueError, KeyError):
                pass  # bwrap failed early; the handshake reports its error message
            finally:
                os.close(info_read)
                os.close(block_write)
        return process

    def _bwrap_options(self) -> list[str]:
        options = ["--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                   "--hostname", "sandbox", "--clearenv"]
        for name, value in _worker_environment("/tmp").items():
            options += ["--setenv", name, value]
        options += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                options += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                options += ["--ro-bind", top, top]
        options += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
                    "--proc", "/proc", "--dev", "/dev",
                    "--size", str(self.config.tmp_mb << 20), "--perms", "1777", "--tmpfs", "/tmp"]
        bound, parents = ["/usr"], set()
        for path in sorted({sys.base_prefix, sys.base_exec_prefix, *self._site_dirs}, key=len):
            if any(path == root or path.startswith(root + os.sep) for root in bound):
                continue
            # bwrap would copy the host's modes onto the directories it creates on the way
            # (/root is 0700), which would lock the unprivileged worker out of the installation.
            for parent in _ancestors(path):
                if parent not in parents:
                    options += ["--perms", "0755", "--dir", parent]
                    parents.add(parent)
            options += ["--ro-bind", path, path]
            bound.append(path)
        # bwrap's new root and its /dev are tmpfs mounts owned by whoever runs bwrap: without these
        # remounts a host that is not root would hand the program a writable /, /etc and /dev/shm
        # (no size cap, not cleaned between programs). /tmp is a mount of its own and stays writable.
        options += ["--remount-ro", "/dev", "--remount-ro", "/"]
        return options + ["--chdir", "/tmp"]


def _map_user_ids(info_read: int) -> None:
    """Map root (for bwrap's own setup) and the unprivileged id into bwrap's user namespace."""
    info = b""
    while chunk := os.read(info_read, 4096):
        info += chunk
    child = json.loads(info)["child-pid"]
    mapping = f"0 0 1\n{_UNPRIVILEGED_ID} {_UNPRIVILEGED_ID} 1\n"
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as handle:
            handle.write(mapping)


def _ancestors(path: str) -> list[str]:
    """Directories above `path`, outermost first, without the root."""
    parents = []
    while (path := os.path.dirname(path)) not in ("/", ""):
        parents.append(path)
    return parents[::-1]


def _handshake(process: subprocess.Popen, errors: io.BufferedRandom, *, hint: str) -> None:
    """Wait for the worker's hello; on failure raise with whatever bwrap or Python printed."""
    assert process.stdout is not None
    try:
        hello = json.loads(_read_frame(process.stdout.fileno(),
                                       time.monotonic() + _WORKER_START_TIMEOUT_S))
        if hello.get("ready") is True:
            return
        problem = str(hello)
    except (_WorkerDied, ValueError) as exc:
        problem = str(exc)
    _stop_process(process)
    errors.seek(0)
    detail = errors.read().decode("utf-8", "replace").strip().replace("\n", " | ")
    raise SandboxUnavailable(f"sandbox worker failed to start: {detail or problem}"
                             + (f"; {hint}" if hint else ""))


def _base_interpreter() -> str:
    """The interpreter binary inside sys.base_prefix (a venv's python is only a link to it)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = os.path.join(sys.base_prefix, "bin", version)
    return candidate if os.path.exists(candidate) else os.path.realpath(sys.executable)


def _worker_environment(scratch: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        # BLAS thread pools started in the worker would not survive the fork, and each program
        # runs under a CPU-time limit anyway.
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        # Resolve every library symbol while the worker loads, not in each child: a lazy
        # resolution writes the symbol table, which costs the child a page copy.
        "LD_BIND_NOW": "1",
    }


_SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name: (x86_64, aarch64)
    "clone": (56, 220), "unshare": (272, 97), "setns": (308, 268), "clone3": (435, 435),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "prlimit64": (302, 261), "setpriority": (141, 140), "sched_setaffinity": (203, 122),
    "sched_setscheduler": (144, 119), "sched_setparam": (142, 118), "sched_setattr": (314, 274),
    "socket": (41, 198), "socketpair": (53, 199), "mq_open": (240, 180), "add_key": (248, 217),
    "request_key": (249, 218), "keyctl": (250, 219), "memfd_create": (319, 279),
    "fcntl": (72, 25), "ioctl": (16, 29),
}
_BPF_LOAD, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_ALLOW, _SECCOMP_EPERM, _SECCOMP_ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
_X32_SYSCALL_BIT = 0x40000000


def _syscall_numbers() -> tuple[int, dict[str, int]]:
    """(AUDIT_ARCH, syscall numbers) of this machine; SandboxUnavailable when there is no table."""
    machine = os.uname().machine
    if machine not in _SECCOMP_ARCH:
        raise SandboxSetupError(f"no seccomp syscall table for {machine}; {_FIX_HINT}")
    column = tuple(_SECCOMP_ARCH).index(machine)
    return _SECCOMP_ARCH[machine], {name: numbers[column] for name, numbers in _SYSCALLS.items()}


def _argument(index: int) -> tuple:
    """Load the low half of a system call argument (seccomp_data.args[index])."""
    return (_BPF_LOAD, None, None, 16 + 8 * index)


def _assemble(body: list) -> bytes:
    """Classic BPF for seccomp: an architecture check (x32 refused), `body` with the system call
    number loaded, then the verdicts. Instructions are (code, jump-if-true, jump-if-false, k) with
    jumps to labels ("next", "allow", "eperm", "enosys" or a ("label", name) entry of `body`)."""
    arch, _ = _syscall_numbers()
    program = [
        (_BPF_LOAD, None, None, 4),              # seccomp_data.arch
        (_BPF_JEQ, "next", "enosys", arch),
        (_BPF_LOAD, None, None, 0),              # seccomp_data.nr
        # x32 system calls are the x86_64 numbers with this bit set: refuse them all.
        *([(_BPF_JGE, "enosys", "next", _X32_SYSCALL_BIT)] if arch == _SECCOMP_ARCH["x86_64"] else []),
        *body,
        (_BPF_RET, None, None, _SECCOMP_ALLOW),
        ("label", "allow"), (_BPF_RET, None, None, _SECCOMP_ALLOW),
        ("label", "eperm"), (_BPF_RET, None, None, _SECCOMP_EPERM),
        ("label", "enosys"), (_BPF_RET, None, None, _SECCOMP_ENOSYS),
    ]
    labels, instructions = {}, []
    for entry in program:
        if entry[0] == "label":
            labels[entry[1]] = len(instructions)
        else:
            instructions.append(entry)
    encoded = b""
    for index, (code, if_true, if_false, k) in enumerate(instructions):
        offsets = [0 if target in (None, "next") else labels[target] - index - 1 for target in (if_true, if_false)]
        encoded += struct.pack("=HBBI", code, *offsets, k)
    return encoded


def _namespace_seccomp_filter() -> bytes:
    """The container's filter (bwrap --seccomp): refuse unshare, setns, clone3 and user-namespace
    clones; allow everything else. clone3 gets ENOSYS so glibc falls back to plain clone."""
    _, nr = _syscall_numbers()
    clone_newuser = 0x10000000
    return _assemble([
        (_BPF_JEQ, "eperm", "next", nr["unshare"]),
        (_BPF_JEQ, "eperm", "next", nr["setns"]),
        (_BPF_JEQ, "enosys", "next", nr["clone3"]),
        (_BPF_JEQ, "next", "allow", nr["clone"]),
        _argument(0),                            # clone flags
        (_BPF_JSET, "eperm", "allow", clone_newuser),
    ])


def _program_seccomp_filter(worker_pid: int) -> bytes:
    """The filter each program runs under (see the module docstring): what it may not do to its worker."""
    _, nr = _syscall_numbers()
    negative = 0x80000000  # a pid argument at or above this is a process group or "every process"
    refused = ("pidfd_open", "pidfd_send_signal", "mq_open", "add_key", "request_key", "keyctl", "memfd_create")
    socket_families = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
    body: list = [(_BPF_JEQ, "eperm", "next", nr[name]) for name in refused]
    for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        body.append((_BPF_JEQ, "signal", "next", nr[name]))
    for name in ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr"):
        body.append((_BPF_JEQ, "self_only", "next", nr[name]))
    # Making another process a file's owner has the kernel signal it (SIGIO, or any signal chosen
    # with F_SETSIG) when the file is ready: fcntl F_SETOWN / F_SETOWN_EX / F_SETSIG, ioctl
    # FIOSETOWN / SIOCSPGRP. A program has no use for them.
    owner_commands = {"fcntl": (8, 10, 15), "ioctl": (0x8901, 0x8902)}
    body += [(_BPF_JEQ, ("owner", name), "next", nr[name]) for name in owner_commands]
    body += [
        (_BPF_JEQ, "priority", "next", nr["setpriority"]),
        (_BPF_JEQ, "family", "next", nr["socket"]),
        (_BPF_JEQ, "family", "allow", nr["socketpair"]),
        ("label", "signal"), _argument(0),       # the target pid (tgid for tgkill)
        (_BPF_JGE, "eperm", "next", negative),
        (_BPF_JEQ, "eperm", "next", 0),
        (_BPF_JEQ, "eperm", "next", 1),
        (_BPF_JEQ, "eperm", "allow", worker_pid),
        ("label", "self_only"), _argument(0),    # pid 0: the calling process
        (_BPF_JEQ, "allow", "eperm", 0),
        ("label", "priority"), _argument(0),     # which: PRIO_PROCESS only, and who: the caller
        (_BPF_JEQ, "next", "eperm", 0),
        _argument(1),
        (_BPF_JEQ, "allow", "eperm", 0),
        ("label", "family"), _argument(0),
        *[(_BPF_JEQ, "allow", "next", family) for family in socket_families],
        (_BPF_RET, None, None, _SECCOMP_EPERM),
    ]
    for name, commands in owner_commands.items():
        body += [("label", ("owner", name)), _argument(1)]
        body += [(_BPF_JEQ, "eperm", "next", command) for command in commands]
        body.append((_BPF_RET, None, None, _SECCOMP_ALLOW))
    return _assemble(body)


# ---------------------------------------------------------------------------------------------
# Worker side: runs inside the sandbox as `python -c <this file> --kaizen-sandbox-worker SETTINGS`.


def _worker_main(settings: dict) -> None:
    import ctypes
    import site

    protocol_in, protocol_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if settings["drop_to_id"] is not None and os.getuid() == 0:
        unprivileged = settings["drop_to_id"]
        os.setgroups([])
        os.setresgid(unprivileged, unprivileged, unprivileged)
        os.setresuid(unprivileged, unprivileged, unprivileged)
    if settings["pid_namespace"] and _effective_capabilities() != 0:
        raise SystemExit("sandbox worker still holds capabilities; refusing to run programs")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: programs (same uid) cannot ptrace the worker
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans are reparented to us and reaped
    os.environ.pop("LD_BIND_NOW", None)  # done its job; programs' subprocesses start lazily
    site.setquit()  # exit() and quit(), which -S leaves out
    for directory in settings["site_dirs"]:
        site.addsitedir(directory)
    for module in settings["preload"]:
        try:
            __import__(module)
        except ImportError:
            continue  # numpy is optional
        try:
            exec(_WARM_UP.get(module, ""), {})
        except Exception:
            pass  # a library version without one of these functions: the rest is warm
    confine = _program_confinement(libc) if settings["pid_namespace"] else None
    runner = _ProgramRunner(settings, (protocol_in, protocol_out), libc.sched_getcpu, confine)
    # Objects that exist now are never collected in children: a collection would touch (and so
    # copy) every page of the forked heap.
    gc.collect()
    gc.freeze()
    # The worker makes no reference cycles worth collecting; children turn collection back on.
    gc.disable()
    _write_frame(protocol_out, json.dumps({"ready": True}).encode())
    os.dup2(devnull, 2)
    while True:
        try:
            code = _read_frame(protocol_in, None)
        except _WorkerDied:
            return  # host closed the pipe
        reply, healthy = runner.run(code)
        if not healthy:
            reply["retire"] = True
        _write_frame(protocol_out, json.dumps(reply).encode())
        if not healthy:
            return  # the host starts a fresh worker


def _program_confinement(libc: Any) -> Callable[[], None]:
    """What a forked child calls, before the program runs, to put itself under the program filter."""
    import ctypes

    code = _program_seccomp_filter(os.getpid())
    instructions = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = SockFprog(len(code) // 8, ctypes.addressof(instructions))

    def confine(_keep_alive: tuple = (instructions, program)) -> None:
        if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            raise OSError(ctypes.get_errno(), "cannot install the program's seccomp filter")

    return confine


def _effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


class _ProgramRunner:
    """Forks one child per program, supervises it and cleans up after it (worker side)."""

    def __init__(self, settings: dict, protocol_fds: tuple[int, int],
                 current_cpu: Callable[[], int], confine: Callable[[], None] | None) -> None:
        self._protocol_fds = protocol_fds
        self._confine = confine
        self._scratch = settings["scratch_dir"]
        self._workdir = os.path.join(self._scratch, "program")
        self._skeleton = _scratch_skeleton(self._scratch)
        self._pid_namespace = settings["pid_namespace"]
        self._timeout_s = settings["timeout_s"]
        self._output_limit = settings["max_output_bytes"]
        with open("/proc/self/statm") as statm:
            preloaded_bytes = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        # Wall time bounds CPU time of one thread; this only stops programs burning several cores.
        self._cpu_seconds = int(self._timeout_s) + 1
        # RLIMIT_NPROC counts every process of this uid (in this user namespace), the worker too.
        processes = _count_processes_of(os.getuid()) + settings["max_processes"]
        # Created once, written only in children (after fd 1 and 2 point at their pipes), so no
        # child pays for building them.
        self._streams = (
            io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                             errors="backslashreplace"),
            io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                             errors="backslashreplace", line_buffering=True),
        )
        self._current_cpu = current_cpu
        self._all_cpus = os.sched_getaffinity(0)
        self._ipc_tables = [os.open(f"/proc/sysvipc/{name}", os.O_RDONLY)
                            for name in ("shm", "sem", "msg")] if self._pid_namespace else []
        self._limits = [  # (resource, soft, hard)
            (resource.RLIMIT_AS, *[preloaded_bytes + (settings["memory_mb"] << 20)] * 2),
            # SIGXCPU at the soft limit is reported as a timeout; SIGKILL one second later.
            (resource.RLIMIT_CPU, self._cpu_seconds, self._cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, *[settings["max_file_bytes"]] * 2),
            (resource.RLIMIT_NPROC, processes, processes),
            (resource.RLIMIT_CORE, 0, 0),
        ]

    def run(self, code: bytes) -> tuple[dict, bool]:
        """(reply, whether the worker is still clean enough to serve the next program)."""
        workdir = self._workdir
        os.mkdir(workdir, 0o700)
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        status_read, status_write = os.pipe()
        # The child is born on this CPU (not woken on an idle one, which costs milliseconds on
        # virtual machines), runs while we wait, and is then free to move.
        os.sched_setaffinity(0, (self._current_cpu(),))
        pid = os.fork()
        if pid == 0:
            os.sched_setaffinity(0, self._all_cpus)
            for fd in (stdout_read, stderr_read, status_read, *self._protocol_fds,
                       *self._ipc_tables):
                os.close(fd)
            _run_child(code, workdir, stdout_write, stderr_write, status_write, self._limits,
                       self._streams, new_process_group=not self._pid_namespace, confine=self._confine)
        os.sched_setaffinity(0, self._all_cpus)
        for fd in (stdout_write, stderr_write, status_write):
            os.close(fd)
        stdout, stderr_tail, timed_out = self._supervise(pid, stdout_read, stderr_read)
        self._kill_leftovers(pid)
        _, wait_status, _ = os.wait4(pid, 0)
        self._reap_orphans()
        stdout += self._drain(stdout_read, self._output_limit + 1 - len(stdout))
        status = self._drain(status_read, 1 << 20)
        for fd in (stdout_read, stderr_read, status_read):
            os.close(fd)
        healthy = self._clean_scratch(workdir)
        text = stdout[:self._output_limit].decode("utf-8", "replace")
        if len(stdout) > self._output_limit:
            text += _TRUNCATION_MARKER.format(limit=self._output_limit)
        if timed_out:
            outcome = {"error": "timeout", "timed_out": True}
        elif os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0:
            # Only a child that wrote its report exits 0; a program that wrote into the pipe and
            # then stopped the report going out (closed the pipe, crashed) is not believed, nor is
            # one that ended with os._exit(0) or pointed the pipe elsewhere, leaving no report.
            outcome = _parse_status(status) if status else {"error": _NO_REPORT_ERROR}
        else:
            outcome = self._describe_exit(wait_status, stderr_tail)
        reply = {"ok": False, "error": None, "timed_out": False, "memory_exceeded": False,
                 **outcome, "stdout": text}
        return reply, healthy

    def _supervise(self, pid: int, stdout_read: int,
                   stderr_read: int) -> tuple[bytes, bytes, bool]:
        """Read output while the child runs: (stdout, stderr tail, timed out)."""
        child = os.pidfd_open(pid)
        poller = select.poll()
        for fd in (child, stdout_read, stderr_read):
            poller.register(fd, select.POLLIN)
        stdout, stderr_tail = bytearray(), bytearray()
        deadline = time.monotonic() + self._timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return stdout, stderr_tail, True
                for fd, _ in poller.poll(remaining * 1000):
                    if fd == child:
                        return stdout, stderr_tail, False
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        poller.unregister(fd)
                    elif fd == stdout_read:
                        # Keep one byte past the limit so truncation can be told apart; the
                        # rest is read and dropped so the program never blocks on a full pipe.
                        stdout += chunk[:max(0, self._output_limit + 1 - len(stdout))]
                    else:
                        stderr_tail = (stderr_tail + chunk)[-_STDERR_TAIL_BYTES:]
        finally:
            os.close(child)

    def _kill_leftovers(self, pid: int) -> None:
        try:
            if self._pid_namespace:
                # Everything in this PID namespace except us and its init: the program, its
                # children, grandchildren that left the process group, all their threads.
                os.kill(-1, signal.SIGKILL)
            else:
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap_orphans(self) -> None:
        # With a PID namespace every leftover was killed, so waiting cannot hang; without one a
        # process that left the group may live on and is only collected if already dead.
        options = 0 if self._pid_namespace else os.WNOHANG
        while True:
            try:
                pid, _ = os.waitpid(-1, options)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _drain(self, fd: int, keep: int) -> bytes:
        """The rest of a pipe, keeping at most `keep` bytes. With a PID namespace all writers are
        dead, so this ends at EOF; without one a stray writer may live on, so it ends early."""
        deadline = time.monotonic() + (0.0 if self._pid_namespace else 0.2)
        data = bytearray()
        while self._pid_namespace or _readable(fd, deadline - time.monotonic()):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk[:max(0, keep - len(data))]
        return bytes(data)

    def _clean_scratch(self, workdir: str) -> bool:
        """Empty the scratch directory; False if that failed or IPC objects were left behind."""
        try:
            os.rmdir(workdir)  # the common case: the program left no files
        except OSError:
            pass
        leftover_ipc = any(len(os.pread(fd, 4096, 0).splitlines()) > 1 for fd in self._ipc_tables)
        return self._remove_all_but_skeleton(self._scratch) and not leftover_ipc

    def _remove_all_but_skeleton(self, directory: str) -> bool:
        """Delete everything under `directory` that was not there before the first program;
        False if something could not be deleted or a skeleton directory was replaced."""
        healthy = True
        with os.scandir(directory) as entries:
            for entry in entries:
                descend = self._skeleton.get(entry.path)
                try:
                    if descend is None and entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    elif descend is None:
                        os.unlink(entry.path)
                    elif descend and entry.is_dir(follow_symlinks=False):
                        healthy &= self._remove_all_but_skeleton(entry.path)
                    elif descend:
                        healthy = False  # the program swapped a skeleton directory for a file
                except OSError:
                    healthy = False  # e.g. a directory made unreadable: a fresh worker takes over
        return healthy

    def _describe_exit(self, wait_status: int, stderr_tail: bytes) -> dict:
        """Outcome of a child that failed without reporting (a non-zero os._exit, or a signal)."""
        if os.WIFEXITED(wait_status):
            return {"error": f"exited with status {os.WEXITSTATUS(wait_status)}"}
        number = os.WTERMSIG(wait_status)
        if number == signal.SIGXCPU:
            return {"error": f"timeout (CPU time limit of {self._cpu_seconds} s)",
                    "timed_out": True}
        # Under RLIMIT_AS some native code aborts instead of raising MemoryError; it says so on
        # stderr.
        if any(marker in stderr_tail for marker in _OUT_OF_MEMORY_MARKERS):
            return {"error": "memory limit exceeded", "memory_exceeded": True}
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        last_line = stderr_tail.decode("utf-8", "replace").strip().splitlines()[-1:]
        return {"error": ": ".join([f"killed by signal {name}", *last_line])[:_ERROR_TEXT_LIMIT]}


_NO_REPORT_ERROR = "ended without reporting its outcome (os._exit, or the report pipe redirected)"
_OUT_OF_MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"out of memory",
                          b"bad_alloc")


def _scratch_skeleton(scratch: str) -> dict[str, bool]:
    """What the scratch directory holds before any program runs, as {path: clean inside it}.
    Usually nothing. But when the Python installation or site-packages live under the host's
    /tmp, bwrap builds their mount points inside the sandbox's /tmp: the directories on the way
    (on the scratch tmpfs; cleaned inside, kept themselves) and the read-only binds (left alone).
    Treating them as a program's leftovers would fail to delete them after every program and so
    replace the worker every time."""
    device = os.stat(scratch).st_dev
    skeleton: dict[str, bool] = {}
    pending = [scratch]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                # A mount point reports the device of the file system mounted on it.
                on_scratch = (entry.is_dir(follow_symlinks=False)
                              and entry.stat(follow_symlinks=False).st_dev == device)
                skeleton[entry.path] = on_scratch
                if on_scratch:
                    pending.append(entry.path)
    return skeleton


def _parse_status(status: bytes) -> dict:
    """The child's report; the program could have written into that pipe too, so check it."""
    try:
        outcome = json.loads(status)
    except (ValueError, RecursionError):
        outcome = None
    if not isinstance(outcome, dict) or not set(outcome) <= _STATUS_TYPES.keys() or not all(
            isinstance(value, _STATUS_TYPES[key]) for key, value in outcome.items()) or len(
            outcome.get("error") or "") > _ERROR_TEXT_LIMIT:
        return {"error": "the program overwrote the sandbox's status report"}
    return outcome


# What a child reports; timeouts are the worker's to declare, never the child's.
_STATUS_TYPES = {"ok": bool, "error": (str, type(None)), "memory_exceeded": bool}


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as status:
                    for line in status:
                        if line.startswith("Uid:"):
                            count += int(line.split()[1]) == uid
                            break
            except OSError:
                pass
    return count


def _run_child(code: bytes, workdir: str, stdout_fd: int, stderr_fd: int, status_fd: int,
               limits: list[tuple[int, int, int]], streams: tuple[io.TextIOWrapper, ...], *,
               new_process_group: bool, confine: Callable[[], None] | None) -> None:
    """The forked child: limits, redirections, the program, a status report. Never returns."""
    me = os.getpid()
    memory_report = b'{"error": "memory limit exceeded", "memory_exceeded": true}'
    exit_status = 1  # unless a report went out: then "exited with status 1", never "ok"
    try:
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.close(stdout_fd)
        os.close(stderr_fd)
        if new_process_group:
            os.setpgid(0, 0)
        for kind, soft, hard in limits:
            resource.setrlimit(kind, (soft, hard))
        if confine is not None:
            confine()
        os.chdir(workdir)
        sys.stdout, sys.stderr = streams
        gc.enable()
        try:
            report = _execute(code)
        except MemoryError:
            report = memory_report
        for stream in (sys.stdout, sys.stderr, *streams):  # the program may have swapped them
            try:
                stream.flush()
            except Exception:  # a closed or replaced stream is the program's business
                pass
        if os.getpid() == me:  # a program that forked: only the original reports
            os.write(status_fd, report)
        exit_status = 0
    except MemoryError:
        if os.getpid() == me:
            os.write(status_fd, memory_report)
        exit_status = 0
    finally:
        os._exit(exit_status)


def _execute(code: bytes) -> bytes:
    def failure(error: str) -> bytes:
        return json.dumps({"error": error[:_ERROR_TEXT_LIMIT]}).encode()

    try:
        compiled = compile(code.decode("utf-8"), "<program>", "exec")
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return failure(f"syntax error: {exc.msg}{where}")
    except MemoryError:
        raise
    except Exception as exc:  # null bytes, nesting too deep for the compiler, ...
        return failure(f"syntax error: {exc}")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compiled, namespace)
    except MemoryError:
        raise
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return b'{"ok": true}'
        return failure(traceback.format_exception_only(type(exc), exc)[-1].strip())
    except BaseException as exc:
        return failure(traceback.format_exception_only(type(exc), exc)[-1].strip())
    return b'{"ok": true}'


# ---------------------------------------------------------------------------------------------
# CLI


def cli_exec(argv: list[str]) -> int:
    """`kaizen exec`: run a program from stdin (or JSON lines with --batch) and print JSON."""
    from search.arguments import OneLineParser

    parser = OneLineParser(prog="kaizen exec", description=(
        "Run a Python program read from stdin in the code sandbox and print one JSON object "
        '{"ok", "stdout", "error", "timed_out", "memory_exceeded"}. Exit status is 0 whatever the '
        "program did."))
    parser.add_argument("--timeout", type=float, default=SandboxConfig.timeout_s, metavar="S",
                        help="wall-clock limit per program in seconds (default %(default)s)")
    parser.add_argument("--memory-mb", type=int, default=SandboxConfig.memory_mb, metavar="M",
                        help="memory per program on top of the interpreter, MiB "
                             "(default %(default)s)")
    parser.add_argument("--batch", action="store_true",
                        help='read JSON lines {"code": ...}; print one result line each, in order')
    parser.add_argument("--isolation", choices=("bwrap", "none"), default="bwrap",
                        help="'none' runs without namespaces: UNSAFE, for machines without them")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        config = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb,
                               isolation=args.isolation)
    except ValueError as exc:
        print(f"kaizen exec: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.batch:
            return _exec_batch(config)
        return _exec_single(config)
    except SandboxUnavailable as exc:
        print(f"kaizen exec: error: {exc}", file=sys.stderr)
        return 1


def _exec_single(config: SandboxConfig) -> int:
    # Read one byte past the limit: enough to reject an oversized program without holding it all.
    data = sys.stdin.buffer.read(config.max_program_bytes + 1)
    if len(data) > config.max_program_bytes:
        result = ExecResult.failure(f"program too large: more than {config.max_program_bytes} bytes")
    else:
        try:
            code = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            result = ExecResult.failure(
                f"program is not valid UTF-8: {exc.reason} at byte {exc.start}")
        else:
            result = _rejection(code, config) or _run_one(code, config)
    print(json.dumps(result.to_json()))
    return 0


def _run_one(code: str, config: SandboxConfig) -> ExecResult:
    with Sandbox(config) as sandbox:
        return sandbox.run(code)


_BATCH_CHUNK = 256


def _exec_batch(config: SandboxConfig) -> int:
    programs = []
    for number, line in enumerate(sys.stdin.buffer, start=1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as exc:
            print(f"kaizen exec: error: line {number}: malformed JSON ({exc}); nothing was run",
                  file=sys.stderr)
            return 2
        if not isinstance(request, dict) or not isinstance(request.get("code"), str):
            print(f'kaizen exec: error: line {number}: expected an object with a string "code" '
                  "field; nothing was run", file=sys.stderr)
            return 2
        programs.append(request["code"])
    if not programs:
        return 0
    with Sandbox(config) as sandbox:
        for start in range(0, len(programs), _BATCH_CHUNK):
            for result in sandbox.run_many(programs[start:start + _BATCH_CHUNK]):
                sys.stdout.write(json.dumps(result.to_json()) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == [_WORKER_FLAG]:
    _worker_main(json.loads(sys.argv[2]))
