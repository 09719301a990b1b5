"""Sandbox throughput against starting a fresh interpreter per program, side by side.

Runs the same short programs (arithmetic, fractions, math, list work) through `Sandbox.run_many`
and through `python -I [-S] -c` (this interpreter, no isolation) one after another and two at a time,
then the same for sympy programs, and prints executions per second and the ratios. Targets
(issue 2): >= 500 isolated executions/s for short programs on 2 cores, and >= 15x the rate of a
fresh interpreter per program.

Besides wall-clock rates it reports CPU time per execution, summed over every process involved
(host, bwrap, workers, programs; for python -c the interpreters). That figure hardly depends on
what else the machine is doing, so `cpu-bound exec/s` (all CPUs busy with nothing else) stays
comparable between runs on a shared machine.

    .venv/bin/python benchmarks/bench_sandbox.py [--programs 4000] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.sandbox import Sandbox, SandboxConfig  # noqa: E402

SHORT_PROGRAMS = [
    "print(sum(range(100)))",
    "from fractions import Fraction\nprint(Fraction(1, 3) + Fraction(1, 6))",
    "import math\nprint(math.comb(10, 3), math.sqrt(2))",
    "squares = [i * i for i in range(50)]\nprint(max(squares))",
]
SYMPY_PROGRAMS = [
    "import sympy\nprint(sympy.Rational(1, 3) + sympy.Rational(1, 6))",
    "from sympy import symbols, factor\nx = symbols('x')\nprint(factor(x**2 - 1))",
]


def fresh_interpreter(program: str, site: bool) -> str:
    """Run `program` in a new interpreter started as lean as it can be: isolated (-I) and, for programs
    that need only the standard library, without the site module (-S), as the sandbox's own workers
    start. With site, this development install's editable-package hook alone costs ~11 ms a start,
    which would flatter the sandbox."""
    flags = ["-I"] if site else ["-I", "-S"]
    completed = subprocess.run([sys.executable, *flags, "-c", program], capture_output=True, text=True,
                               check=True)
    return completed.stdout


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children and every live descendant (with theirs)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    parents, times = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(value) for value in fields[11:15])  # utime..cstime
    descendants, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        descendants += children
        frontier = children
    return total + sum(times[pid] for pid in descendants) / os.sysconf("SC_CLK_TCK")


def measure(label: str, run: Callable[[list[str]], list[str]], programs: list[str],
            expected: dict[str, str]) -> dict:
    cpu_before, start = cpu_seconds(), time.perf_counter()
    outputs = run(programs)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    wrong = sum(output != expected[program] for program, output in zip(programs, outputs))
    if wrong:
        raise SystemExit(f"{label}: {wrong} programs printed something unexpected")
    cpu_ms = 1e3 * cpu / len(programs)
    return {"mode": label, "programs": len(programs), "seconds": round(seconds, 3),
            "per_second": round(len(programs) / seconds, 1), "cpu_ms_per_exec": round(cpu_ms, 2),
            "cpu_bound_per_second": round(1e3 * len(os.sched_getaffinity(0)) / cpu_ms, 1)}


def cycle(programs: Sequence[str], count: int) -> list[str]:
    return [programs[i % len(programs)] for i in range(count)]


def compare(kind: str, programs: Sequence[str], sandbox: Sandbox, count: int,
            baseline_count: int, *, site: bool) -> list[dict]:
    fresh = functools.partial(fresh_interpreter, site=site)
    expected = {program: fresh(program) for program in programs}
    in_sandbox = cycle(programs, count)
    baseline = cycle(programs, baseline_count)
    sandbox.run_many(list(programs) * 4)  # warm up (heavy workers start on first use)

    def sandboxed(batch: list[str]) -> list[str]:
        results = sandbox.run_many(batch)
        return [result.stdout for result in results]

    def two_at_a_time(batch: list[str]) -> list[str]:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(fresh, batch))

    rows = [
        measure(f"{kind}: python -c, one at a time", lambda b: list(map(fresh, b)),
                baseline, expected),
        measure(f"{kind}: python -c, two at a time", two_at_a_time, baseline, expected),
        measure(f"{kind}: Sandbox.run_many ({sandbox.config.workers} workers)", sandboxed,
                in_sandbox, expected),
    ]
    ours = rows[2]["per_second"]
    rows[2]["vs_one_at_a_time"] = round(ours / rows[0]["per_second"], 1)
    rows[2]["vs_two_at_a_time"] = round(ours / rows[1]["per_second"], 1)
    rows[2]["cpu_vs_python_c"] = round(rows[1]["cpu_ms_per_exec"] / rows[2]["cpu_ms_per_exec"], 1)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':<46} {'programs':>8} {'seconds':>8} {'exec/s':>8} {'x seq':>6} "
          f"{'x par':>6} {'cpu ms':>7} {'cpu-bound exec/s':>16} {'x cpu':>6}")
    for row in rows:
        print(f"{row['mode']:<46} {row['programs']:>8} {row['seconds']:>8.2f} "
              f"{row['per_second']:>8.1f} {row.get('vs_one_at_a_time', ''):>6} "
              f"{row.get('vs_two_at_a_time', ''):>6} {row['cpu_ms_per_exec']:>7.2f} "
              f"{row['cpu_bound_per_second']:>16.1f} {row.get('cpu_vs_python_c', ''):>6}")


def write_json(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(figures, tmp, indent=2)
    os.replace(tmp.name, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=4000, help="short programs in the sandbox")
    parser.add_argument("--sympy-programs", type=int, default=600,
                        help="sympy programs in the sandbox")
    parser.add_argument("--baseline-programs", type=int, default=200,
                        help="short programs through python -c (each mode)")
    parser.add_argument("--sympy-baseline-programs", type=int, default=20,
                        help="sympy programs through python -c (each mode)")
    parser.add_argument("--workers", type=int, default=SandboxConfig.workers)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    start = time.perf_counter()
    sandbox = Sandbox(SandboxConfig(workers=args.workers))
    startup_s = time.perf_counter() - start
    try:
        rows = compare("short", SHORT_PROGRAMS, sandbox, args.programs, args.baseline_programs, site=False)
        rows += compare("sympy", SYMPY_PROGRAMS, sandbox, args.sympy_programs,
                        args.sympy_baseline_programs, site=True)
        latencies = []
        for program in cycle(SHORT_PROGRAMS, 200):
            began = time.perf_counter()
            sandbox.run(program)
            latencies.append(time.perf_counter() - began)
    finally:
        sandbox.close()
    latencies.sort()
    figures = {
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "sandbox_startup_s": round(startup_s, 3),
        "single_run_latency_ms": {"p50": round(latencies[100] * 1e3, 2),
                                  "p95": round(latencies[190] * 1e3, 2)},
        "rows": rows,
    }
    print_table(rows)
    print(f"sandbox start-up {figures['sandbox_startup_s']} s; one run() at a time: "
          f"p50 {figures['single_run_latency_ms']['p50']} ms, "
          f"p95 {figures['single_run_latency_ms']['p95']} ms; {figures['cpus']} CPUs, "
          f"load average before {figures['load_average_before'][0]}")
    if args.json:
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
