"""The round gate: whether this round's checkpoint may become current and the next round may start.

A pure function of two metric summaries (this round's, the previous round's) and the recipe's rule.
Metrics are keyed `"{benchmark}/{mode}"` (e.g. `"math500/greedy"`) with accuracy in [0, 1], as
`models.evaluation.EvalReport.metrics()` gives them. The rule: the gated metric may not fall by more
than `tolerance`, and must rise by at least `min_gain`. A checkpoint that fails the gate is never
promoted; the reasons say why, in sentences that carry the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from search.evaluation import parse_mode

ROUNDING_SLACK = 1e-9
"""Accuracies are ratios of counts: 0.57 - 0.56 is 0.00999... in floating point, yet a gain of one point."""


@dataclass(frozen=True)
class GateRule:
    """Which metric gates a round and by how much it must move."""

    benchmark: str = field(
        default="math500", metadata={"help": "the benchmark whose metric gates the round (the recipe's main one)"}
    )
    mode: str = field(
        default="greedy", metadata={"help": "the evaluation mode of the gated metric: greedy, maj@K, ppm@K, mcts"}
    )
    min_gain: float = field(
        default=0.0, metadata={"help": "the least rise in accuracy over the previous round (0.01: one point); 0: none"}
    )
    tolerance: float = field(default=0.0, metadata={"help": "the largest fall in accuracy that still passes"})

    def __post_init__(self) -> None:
        # Accuracies are shares in [0, 1]; a NaN would pass every comparison below and let any fall through.
        if not (0 <= self.tolerance <= 1 and 0 <= self.min_gain <= 1):
            raise ValueError(f"gate min_gain and tolerance must be between 0 and 1 (0.01: one point), "
                             f"got {self.min_gain} and {self.tolerance}")
        # The name the metrics carry: "maj@08" is measured as maj@8.
        object.__setattr__(self, "mode", parse_mode(self.mode).name)

    @property
    def metric(self) -> str:
        return f"{self.benchmark}/{self.mode}"


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]

    @property
    def reason(self) -> str:
        """All reasons as one text (the `rounds` table's gate_reason)."""
        return " ".join(self.reasons)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float, *, signed: bool = False) -> str:
    return f"{100 * value:{'+' if signed else ''}.1f} points"


def decide_gate(
    current: Mapping[str, float], previous: Mapping[str, float] | None, rule: GateRule, *, has_ppm: bool = True
) -> GateDecision:
    """Pass or fail this round by `rule`, comparing `current` metrics with the `previous` round's.

    Fails when the gated metric is missing from `current`, fell by more than `rule.tolerance`, or
    (with `rule.min_gain` above 0) rose by less than `rule.min_gain`. A `min_gain` of 0 asks for no
    rise, so the tolerance alone decides: by default (both 0) the metric may not fall at all. With
    no previous round, or one that did not measure the metric, there is nothing to compare with and
    the gate passes saying so; so does a round without a PPM (the bootstrap) gated on a mode that
    needs one.
    """
    metric = rule.metric
    if metric not in current and not has_ppm and parse_mode(rule.mode).needs_ppm:
        return GateDecision(True, [f"{metric} needs a PPM, which this round does not have yet, so the gate passes."])
    if metric not in current:
        available = ", ".join(sorted(current)) or "none"
        return GateDecision(False, [f"The gated metric {metric} is missing from this round's evaluation (it has: {available})."])
    now = current[metric]
    if previous is None or metric not in previous:
        missing = "there is no previous round" if previous is None else f"the previous round did not measure {metric}"
        return GateDecision(True, [f"{metric} is {_percent(now)}; {missing} to compare with, so the gate passes."])
    before = previous[metric]
    change = now - before
    movement = f"{metric} went from {_percent(before)} to {_percent(now)} ({_points(change, signed=True)})"
    if -change > rule.tolerance + ROUNDING_SLACK:
        return GateDecision(False, [f"{movement}: a fall beyond the tolerance of {_points(rule.tolerance)}."])
    if rule.min_gain > 0 and change < rule.min_gain - ROUNDING_SLACK:
        return GateDecision(False, [f"{movement}: short of the required gain of {_points(rule.min_gain)}."])
    gain = f" and at least the required gain of {_points(rule.min_gain)}" if rule.min_gain > 0 else ""
    return GateDecision(True, [f"{movement}: no fall beyond the tolerance of {_points(rule.tolerance)}{gain}; the gate passes."])
