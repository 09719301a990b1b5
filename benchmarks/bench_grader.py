"""Benchmark: grading throughput of the Kaizen `Grader` against plain math-verify, side by side.

Pairs come from the MATH-500 reference answers: every gold is graded against an equivalent
rewrite of itself (`\\dfrac`, `a/b`, `x = 5`, `1,000`, dropped `^\\circ` or units, reordered sums,
respaced tuples, ...) and against a wrong answer (a digit changed, or another problem's answer),
each inside the ending of a solution ("... so the answer is $\\boxed{...}$."). Plain
math-verify runs `verify(parse(gold), parse(pred))` per pair in a pool of as many processes as
the Grader has workers. Both are timed after their processes are up. The verdicts are also
checked against the known labels, and both graders run the MATH-500 self-check (every reference
solution against its own answer).

    python benchmarks/bench_grader.py [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.grading import Grader  # noqa: E402


def shared_data_dir() -> Path:
    if "KAIZEN_SHARED_DATA" in os.environ:
        return Path(os.environ["KAIZEN_SHARED_DATA"])
    return Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def load_rows(file_name: str) -> list[dict]:
    with (shared_data_dir() / file_name).open(encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


# -- building pairs -------------------------------------------------------------------------


def _swap_two_terms(answer: str) -> str | None:
    """`a+b` -> `b+a` when the answer is exactly two terms joined by a top-level `+`."""
    if any(char in answer for char in "-=,<>") or answer.count("+") != 1:
        return None
    depth = 0
    for index, char in enumerate(answer):
        if char in "{([":
            depth += 1
        elif char in "})]":
            depth -= 1
        elif char == "+" and depth == 0:
            left, right = answer[:index].strip(), answer[index + 1 :].strip()
            return f"{right} + {left}" if left and right else None
    return None


def _rewrites(answer: str) -> list[str]:
    """Meaning-preserving rewrites of a non-integer answer, those that change it."""
    forms = []
    if re.fullmatch(r"-?\\frac\{\d+\}\{\d+\}", answer):
        forms.append(re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", answer))
    if "\\dfrac" in answer:
        forms.append(answer.replace("\\dfrac", "\\frac"))
    elif "\\frac" in answer:
        forms.append(answer.replace("\\frac", "\\dfrac"))
    if "^\\circ" in answer:
        forms.append(answer.replace("^\\circ", ""))
    if re.search(r"\d\s*\\(?:text|mbox)\{\s*[a-z]", answer):
        forms.append(re.sub(r"\s*\\(?:text|mbox)\{\s*[a-z ]+\}(\^\d)?$", "", answer))
    if answer.startswith("\\text{("):
        forms.append(re.sub(r"\\text\{\((.)\)\}", r"\1", answer))
    if re.search(r"\\sqrt\{\d\}", answer):
        forms.append(re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", answer))
    if (swapped := _swap_two_terms(answer)) is not None:
        forms.append(swapped)
    if "," in answer and not re.search(r"\d(?:,\\!|,\d{3})", answer):  # not a thousands separator
        forms.append(re.sub(r",\s*", ", ", answer).replace("\\left", "").replace("\\right", ""))
    if " " in answer and not re.search(r"\\[A-Za-z]+\s+[A-Za-z]", answer):  # "\\pi r" needs its space
        forms.append(re.sub(r"\s+", "", answer))
    return [form for form in forms if form != answer]


def equivalent_form(answer: str, position: int) -> str:
    """A different but equivalent way of writing `answer`; `position` varies the choice."""
    if re.fullmatch(r"-?\d+", answer):
        number = int(answer)
        forms = [answer, f"x = {number}", f"{number}.0"]
        if abs(number) >= 1000:
            forms.append(f"{number:,}")
        elif number >= 0:
            forms.append(f"\\${number}")
        return forms[position % len(forms)]
    forms = _rewrites(answer)
    return forms[position % len(forms)] if forms else f" {answer} "


def wrong_form(answer: str, others: list[str], rng: random.Random) -> str:
    """A wrong answer of the same kind: an integer off by one, a changed digit, else another answer."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    digit = re.search(r"\d", answer)
    if digit is not None:
        changed = str((int(digit.group()) + 1) % 10)
        return answer[: digit.start()] + changed + answer[digit.end() :]
    return rng.choice([other for other in others if other != answer])


def solution_ending(answer: str) -> str:
    return f"Combining the cases above, we get the result.\nTherefore the answer is $\\boxed{{{answer}}}$."


def build_pairs(rows: list[dict]) -> tuple[list[tuple[str, str]], list[bool]]:
    rng = random.Random(0)
    golds = [row["answer"] for row in rows]
    pairs: list[tuple[str, str]] = []
    labels: list[bool] = []
    for position, gold in enumerate(golds):
        pairs.append((solution_ending(equivalent_form(gold, position)), gold))
        labels.append(True)
        pairs.append((solution_ending(wrong_form(gold, golds, rng)), gold))
        labels.append(False)
    return pairs, labels


# -- plain math-verify ------------------------------------------------------------------------


def _plain_init() -> None:
    import logging

    import math_verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    math_verify.verify(math_verify.parse("$1$"), math_verify.parse("$1$"))


def _plain_grade(pair: tuple[str, str]) -> bool:
    from math_verify import parse, verify

    pred, gold = pair
    return bool(verify(parse(f"${gold}$"), parse(pred)))


# -- running --------------------------------------------------------------------------------


@dataclass
class Measurement:
    grader: str
    pairs: int
    seconds: float
    grades_per_s: float
    verdicts_as_labelled: int
    math500_self_check: int
    startup_s: float
    warmup_s: float


@dataclass
class Workload:
    """What both graders are given: warm-up pairs, timed pairs with labels, MATH-500 solutions."""

    warmup: list[tuple[str, str]]
    pairs: list[tuple[str, str]]
    labels: list[bool]
    solutions: list[tuple[str, str]]


def run_kaizen(work: Workload, workers: int) -> Measurement:
    started = time.perf_counter()
    with Grader(workers=workers) as grader:
        startup = time.perf_counter() - started
        grader.grade_many(work.warmup)
        warmup = time.perf_counter() - started - startup
        began = time.perf_counter()
        results = grader.grade_many(work.pairs)
        seconds = time.perf_counter() - began
        self_check = sum(result.equal for result in grader.grade_many(work.solutions))
    verdicts = [result.equal for result in results]
    name = f"kaizen Grader ({workers} workers)"
    return _measurement(name, work, verdicts, seconds, self_check, startup, warmup)


def run_plain(work: Workload, workers: int) -> Measurement:
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_plain_init) as pool:
        pool.map(_plain_grade, [("$1$", "1")] * workers, chunksize=1)  # wait until all are up
        startup = time.perf_counter() - started
        pool.map(_plain_grade, work.warmup, chunksize=16)
        warmup = time.perf_counter() - started - startup
        began = time.perf_counter()
        verdicts = pool.map(_plain_grade, work.pairs, chunksize=16)
        seconds = time.perf_counter() - began
        self_check = sum(pool.map(_plain_grade, work.solutions, chunksize=16))
    name = f"plain math-verify ({workers} processes)"
    return _measurement(name, work, verdicts, seconds, self_check, startup, warmup)


def _measurement(name, work, verdicts, seconds, self_check, startup, warmup) -> Measurement:
    as_labelled = sum(verdict == label for verdict, label in zip(verdicts, work.labels))
    rate = len(work.pairs) / seconds
    return Measurement(name, len(work.pairs), seconds, rate, as_labelled, self_check, startup, warmup)


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
        json.dump(payload, stream, indent=2)
        temporary = stream.name
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="grader workers / math-verify processes")
    parser.add_argument(
        "--warmup", type=int, default=500, help="MATH train problems whose pairs both see first (default 500)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args()

    rows = load_rows("math500_test.jsonl")
    train_rows = load_rows("math_train12k_prm800k_split.jsonl")[: args.warmup]
    pairs, labels = build_pairs(rows)
    work = Workload(
        warmup=build_pairs(train_rows)[0] if train_rows else [],
        pairs=pairs,
        labels=labels,
        solutions=[(row["solution"], row["answer"]) for row in rows],
    )
    kaizen = run_kaizen(work, args.workers)
    plain = run_plain(work, args.workers)
    speedup = kaizen.grades_per_s / plain.grades_per_s

    print(
        f"{len(pairs)} timed (pred, gold) pairs from {len(rows)} MATH-500 answers, after {len(work.warmup)} "
        f"warm-up pairs from the MATH train split; {len(os.sched_getaffinity(0))} CPUs usable"
    )
    header = (
        f"{'grader':34} {'grades/s':>9} {'seconds':>8} {'as labelled':>12} {'MATH-500 self':>14}"
        f" {'startup s':>10} {'warm-up s':>10}"
    )
    print(header)
    print("-" * len(header))
    for m in (kaizen, plain):
        print(
            f"{m.grader:34} {m.grades_per_s:9.0f} {m.seconds:8.2f} {m.verdicts_as_labelled:>6}/{m.pairs:<5}"
            f" {m.math500_self_check:>8}/{len(rows):<5} {m.startup_s:10.2f} {m.warmup_s:10.2f}"
        )
    print(f"speed-up: {speedup:.2f}x")
    if args.json:
        payload = {"kaizen": asdict(kaizen), "plain_math_verify": asdict(plain), "speedup": speedup}
        write_json_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
