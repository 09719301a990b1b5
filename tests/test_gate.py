"""The round gate on hand-made metric summaries."""

from __future__ import annotations

import pytest

from models.gate import GateRule, decide_gate

MAIN = "math500/greedy"


def summary(accuracy: float) -> dict[str, float]:
    return {MAIN: accuracy}


def test_a_rise_passes() -> None:
    decision = decide_gate(summary(0.42), summary(0.40), GateRule("math500"))
    assert decision.passed
    assert decision.reasons == [
        "math500/greedy went from 40.0% to 42.0% (+2.0 points): no fall beyond the tolerance of 0.0 points; the gate passes."
    ]


def test_an_unchanged_metric_passes_the_default_rule() -> None:
    assert decide_gate(summary(0.40), summary(0.40), GateRule("math500")).passed


def test_a_fall_beyond_the_tolerance_fails_with_the_numbers() -> None:
    decision = decide_gate(summary(0.37), summary(0.40), GateRule("math500", tolerance=0.02))
    assert not decision.passed
    assert decision.reasons == [
        "math500/greedy went from 40.0% to 37.0% (-3.0 points): a fall beyond the tolerance of 2.0 points."
    ]


def test_a_fall_within_the_tolerance_passes() -> None:
    assert decide_gate(summary(0.39), summary(0.40), GateRule("math500", tolerance=0.02)).passed


def test_a_gain_below_the_minimum_fails() -> None:
    decision = decide_gate(summary(0.41), summary(0.40), GateRule("math500", min_gain=0.02))
    assert not decision.passed
    assert decision.reasons == [
        "math500/greedy went from 40.0% to 41.0% (+1.0 points): short of the required gain of 2.0 points."
    ]


def test_a_gain_of_exactly_the_minimum_passes_despite_float_rounding() -> None:
    assert 0.57 - 0.56 < 0.01  # the rounding this guards against
    assert decide_gate(summary(0.57), summary(0.56), GateRule("math500", min_gain=0.01)).passed


def test_a_fall_of_exactly_the_tolerance_passes_despite_float_rounding() -> None:
    assert 0.58 - 0.57 > 0.01  # the rounding this guards against
    assert decide_gate(summary(0.57), summary(0.58), GateRule("math500", tolerance=0.01)).passed


def test_the_gated_metric_missing_from_this_round_fails_naming_what_is_there() -> None:
    decision = decide_gate({"gsm8k/greedy": 0.5}, summary(0.4), GateRule("math500"))
    assert not decision.passed
    assert decision.reasons == [
        "The gated metric math500/greedy is missing from this round's evaluation (it has: gsm8k/greedy)."
    ]


def test_no_previous_round_passes_saying_so() -> None:
    decision = decide_gate(summary(0.3), None, GateRule("math500", min_gain=0.05))
    assert decision.passed
    assert decision.reasons == ["math500/greedy is 30.0%; there is no previous round to compare with, so the gate passes."]


def test_a_previous_round_without_the_metric_passes_saying_so() -> None:
    decision = decide_gate(summary(0.3), {"gsm8k/greedy": 0.9}, GateRule("math500"))
    assert decision.passed and "the previous round did not measure math500/greedy" in decision.reason


def test_the_rule_gates_the_configured_benchmark_and_mode_only() -> None:
    rule = GateRule("gsm8k", mode="maj@8", min_gain=0.01)
    # math500 collapsing does not matter; gsm8k maj@8 gaining two points does.
    assert decide_gate({MAIN: 0.10, "gsm8k/maj@8": 0.62}, {MAIN: 0.50, "gsm8k/maj@8": 0.60}, rule).passed


@pytest.mark.parametrize("settings", [{"tolerance": -0.01}, {"min_gain": -0.01}, {"tolerance": float("nan")},
                                      {"min_gain": float("nan")}, {"tolerance": 5.0}],
                         ids=["negative tolerance", "negative gain", "NaN tolerance", "NaN gain", "points, not a share"])
def test_thresholds_outside_zero_to_one_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        GateRule("math500", **settings)


def test_a_round_without_a_ppm_passes_a_gate_on_a_ppm_mode() -> None:
    decision = decide_gate(summary(0.3), None, GateRule("math500", mode="mcts"), has_ppm=False)
    assert decision.passed and "needs a PPM" in decision.reasons[0]


def test_a_missing_ppm_metric_still_fails_a_round_that_has_a_ppm() -> None:
    assert not decide_gate(summary(0.3), None, GateRule("math500", mode="ppm@8")).passed


def test_a_round_without_a_ppm_still_fails_a_gate_on_greedy_whose_metric_is_missing() -> None:
    decision = decide_gate({"gsm8k/greedy": 0.5}, summary(0.4), GateRule("math500"), has_ppm=False)
    assert not decision.passed and "is missing" in decision.reason


def test_gate_modes_are_named_as_the_metrics_name_them() -> None:
    assert GateRule("math500", mode="maj@08").metric == "math500/maj@8"


def test_a_fall_of_one_problem_in_a_thousand_fails_the_default_rule() -> None:
    assert 0.407 - 0.406 <= 0.001  # no rounding to lean on: the fall is exactly one in 1000 or less
    decision = decide_gate(summary(0.406), summary(0.407), GateRule("math500"))
    assert not decision.passed and "a fall beyond the tolerance" in decision.reason
