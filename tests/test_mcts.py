"""MCTS bookkeeping on hand-built trees: selection, expansion, rewards and back-propagation.

The driver's part (sampling, running programs, grading, PPM calls) is played by hand here: each
test proposes steps and fills in their evaluation the way `search.rollout` would.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from search.mcts import NODE_COLUMNS, MCTSConfig, Node, NodeKind, SearchMode, Tree

STEP_A = "# Step 1: take a\na = 2\n<end_of_step>"
STEP_B = "# Step 1: take b\nb = 3\n<end_of_step>"
FINAL = "# Now print the final answer\nprint(a + 3)\n<end_of_code>"
FINAL_ALT = "# Print the sum\nprint(3 + a)\n<end_of_code>"
MALFORMED = "# Step 2: cut off by the token lim"
RIGHT = "<answer>\\boxed{5}<end_of_answer>"
WRONG = "<answer>\\boxed{6}<end_of_answer>"
RIGHT_AGAIN = "<answer>So it is \\boxed{5}.<end_of_answer>"


def make_tree(seed: int = 0, **config: Any) -> Tree:
    return Tree("toy", "What is 2 + 3?", MCTSConfig(**config), random.Random(seed))


def expand(
    tree: Tree,
    texts: list[str],
    *,
    failing: frozenset[str] = frozenset(),
    correct: frozenset[str] = frozenset({RIGHT, RIGHT_AGAIN}),
    ppm: dict[str, float] | None = None,
) -> list[Node]:
    """Select the next node and expand it with `texts`, evaluated as the driver would."""
    node = tree.select()
    assert node is not None
    candidates = tree.propose(node, texts)
    for candidate in candidates:
        if candidate.program is not None:
            candidate.program_ok, candidate.output = candidate.step not in failing, "5\n"
        if candidate.parsed.answer_text is not None:
            candidate.correct = candidate.step in correct
        if ppm is not None and tree.needs_ppm_score(candidate):
            candidate.ppm_score = ppm[candidate.step]
    return tree.expand(node, candidates)


def test_q_values_follow_hand_computed_backup() -> None:
    tree = make_tree()
    step_a, _ = expand(tree, [STEP_A, STEP_B], failing=frozenset({STEP_B}))
    final, _ = expand(tree, [FINAL, MALFORMED])
    expand(tree, [RIGHT, WRONG, RIGHT_AGAIN])  # +1, -1, +1 up to the root
    for node in (final, step_a, tree.root):
        assert (node.value_sum, node.visits) == (1.0, 3)


def test_error_nodes_get_minus_one_without_propagating() -> None:
    tree = make_tree()
    step_a, error_1 = expand(tree, [STEP_A, STEP_B], failing=frozenset({STEP_B}))
    _, error_2 = expand(tree, [FINAL, MALFORMED])
    assert [(node.kind, node.value_sum, node.visits) for node in (error_1, error_2)] == [(NodeKind.ERROR, -1.0, 1)] * 2
    assert (step_a.visits, tree.root.visits) == (0, 0)


def test_failed_program_or_malformed_step_becomes_error_node() -> None:
    tree = make_tree()
    kinds = [n.kind for n in expand(tree, [STEP_A, STEP_B, MALFORMED], failing=frozenset({STEP_B}))]
    assert kinds == [NodeKind.STEP, NodeKind.ERROR, NodeKind.ERROR]


def test_program_printing_the_word_error_is_not_an_error_node() -> None:
    tree = make_tree()
    node = tree.select()
    assert node is not None
    [candidate] = tree.propose(node, [STEP_A])
    candidate.program_ok, candidate.output = True, "Error: none, the sandbox said ok\n"
    assert [n.kind for n in tree.expand(node, [candidate])] == [NodeKind.STEP]


def test_identical_samples_become_one_child() -> None:
    tree = make_tree()
    root = tree.select()
    assert root is not None
    candidates = tree.propose(root, [STEP_A, STEP_A, f"\n{STEP_A}\n", STEP_B])
    assert [c.step for c in candidates] == [STEP_A, STEP_B]


def test_unvisited_child_is_selected_before_a_winning_one() -> None:
    for seed in range(10):
        tree = make_tree(seed)
        expand(tree, [STEP_A, STEP_B])
        winner = tree.select()
        expand(tree, [FINAL, FINAL_ALT])
        expand(tree, [RIGHT])  # winner: Q = +1, one final step still open below it
        chosen = tree.select()
        assert winner is not None and (winner.q_value, winner.exhausted) == (1.0, False)
        assert chosen is not None and chosen.parent_id == 0 and chosen.visits == 0


def test_ties_are_broken_by_the_rng() -> None:
    chosen = set()
    for seed in range(20):
        tree = make_tree(seed)
        expand(tree, [STEP_A, STEP_B])
        node = tree.select()
        assert node is not None
        chosen.add(node.step)
    assert chosen == {STEP_A, STEP_B}


def two_visited_children() -> tuple[Tree, Node, Node]:
    """A root visited 5 times over a child with Q = 0.5 from 4 visits and one with Q = 0.2 from 1."""
    tree = make_tree()
    often, once = expand(tree, [STEP_A, STEP_B])
    tree.root.visits = 5
    often.visits, often.value_sum = 4, 2.0
    once.visits, once.value_sum = 1, 0.2
    return tree, often, once


def test_uct_is_q_plus_c_times_the_root_of_log_parent_visits_over_visits() -> None:
    tree, often, once = two_visited_children()
    # Q + 2 * sqrt(ln 5 / N): 0.5 + 2 * sqrt(ln 5 / 4) and 0.2 + 2 * sqrt(ln 5 / 1).
    assert tree.uct(often, tree.root) == pytest.approx(1.7686362)
    assert tree.uct(once, tree.root) == pytest.approx(2.7372725)


def test_selection_picks_the_less_visited_child_with_lower_q_when_its_uct_is_higher() -> None:
    tree, often, once = two_visited_children()
    assert once.q_value < often.q_value
    assert tree.select() is once


def test_rollout_continues_below_the_expanded_node_until_only_terminals_appear() -> None:
    tree = make_tree(rollouts=2)
    [step_a] = expand(tree, [STEP_A])
    assert tree.select() is step_a and tree.rollouts_done == 0
    [final] = expand(tree, [FINAL])
    assert tree.select() is final
    expand(tree, [WRONG])
    assert tree.rollouts_done == 1


def test_tree_finishes_after_the_configured_rollouts() -> None:
    tree = make_tree(rollouts=1)
    expand(tree, [STEP_A, STEP_B])
    expand(tree, [FINAL])
    expand(tree, [WRONG])
    assert tree.finished and tree.select() is None


def test_fully_terminal_subtrees_are_skipped() -> None:
    tree = make_tree(rollouts=10)
    expand(tree, [STEP_A, STEP_B])
    winner = tree.select()
    expand(tree, [FINAL])
    expand(tree, [RIGHT])  # winner: Q = +1 and nothing left to expand below it
    loser = tree.select()
    expand(tree, [FINAL, FINAL_ALT])
    expand(tree, [WRONG])  # loser: Q = -1, one final step still open below it
    chosen = tree.select()
    assert winner is not None and winner.exhausted and loser is not None
    assert chosen is not None and chosen.parent_id == loser.node_id


def test_step_at_max_depth_becomes_depth_limit_with_minus_one_not_propagated() -> None:
    tree = make_tree(max_depth=1)
    [node] = expand(tree, [STEP_A])
    assert (node.kind, node.q_value, tree.root.visits) == (NodeKind.DEPTH_LIMIT, -1.0, 0)


def test_final_code_step_at_max_depth_may_still_answer() -> None:
    tree = make_tree(max_depth=1)
    [final] = expand(tree, [FINAL])
    [answer] = expand(tree, [RIGHT])
    assert (final.kind, answer.kind, answer.depth, tree.root.q_value) == (NodeKind.STEP, NodeKind.ANSWER, 2, 1.0)


def test_ppm_initialises_new_step_nodes_without_propagating() -> None:
    tree = make_tree(mode=SearchMode.PPM)
    step_a, _ = expand(tree, [STEP_A, STEP_B], ppm={STEP_A: -0.4, STEP_B: 0.3})
    assert (step_a.visits, step_a.q_value, step_a.ppm_score) == (1, -0.4, -0.4)
    assert (tree.root.visits, tree.root.value_sum) == (0, 0.0)


def test_ppm_mode_selects_the_child_with_the_best_ppm_score() -> None:
    tree = make_tree(mode=SearchMode.PPM)
    expand(tree, [STEP_A, STEP_B], ppm={STEP_A: -0.4, STEP_B: 0.3})
    node = tree.select()
    assert node is not None and node.step == STEP_B


@pytest.mark.parametrize("mode", [SearchMode.PPM, SearchMode.TEST_TIME], ids=["ppm", "test-time"])
def test_a_mode_scored_by_the_ppm_rejects_an_unscored_step(mode: SearchMode) -> None:
    tree = make_tree(mode=mode)
    with pytest.raises(ValueError, match="PPM score"):
        expand(tree, [STEP_A])


def test_test_time_mode_rewards_answers_with_the_ppm_not_the_reference() -> None:
    tree = make_tree(mode=SearchMode.TEST_TIME)
    expand(tree, [STEP_A], ppm={STEP_A: 0.0})
    expand(tree, [FINAL], ppm={FINAL: 0.0})
    [answer] = expand(tree, [WRONG], ppm={WRONG: 0.25})
    assert (answer.correct, answer.q_value, tree.root.value_sum) == (False, 0.25, 0.25)


def test_expanding_a_node_that_was_not_selected_is_refused() -> None:
    tree = make_tree()
    step_a, step_b = expand(tree, [STEP_A, STEP_B])
    not_selected = step_b if tree.select() is step_a else step_a
    with pytest.raises(ValueError, match="not the pending expansion"):
        tree.expand(not_selected, [])


def test_prompt_of_an_answer_phase_node_shows_the_program_output() -> None:
    tree = make_tree()
    expand(tree, [STEP_A])
    [final] = expand(tree, [FINAL])
    assert tree.prompt(final).endswith(f"{FINAL}\n<output>5<end_of_output>\n")


def test_trajectories_are_root_to_answer_paths() -> None:
    tree = make_tree()
    step_a, _ = expand(tree, [STEP_A, STEP_B], failing=frozenset({STEP_B}))
    [final] = expand(tree, [FINAL])
    right, wrong = expand(tree, [RIGHT, WRONG])
    assert tree.trajectories() == [[step_a, final, right], [step_a, final, wrong]]


def test_node_rows_have_exactly_the_table_columns() -> None:
    tree = make_tree()
    expand(tree, [STEP_A, STEP_B])
    rows = tree.node_rows("run-1", 1)
    assert [tuple(row) for row in rows] == [NODE_COLUMNS] * 3
    assert rows[0] == {
        "run": "run-1", "round": 1, "problem_id": "toy", "node_id": 0, "parent_id": -1, "depth": 0,
        "step": "", "code": "", "output": None, "error": None, "kind": "root", "answer": None, "correct": None,
        "visits": 0, "q_value": 0.0, "ppm_score": None,
    }  # fmt: skip


def test_config_accepts_the_mode_by_name() -> None:
    assert MCTSConfig(mode="test_time").mode is SearchMode.TEST_TIME  # type: ignore[arg-type]


def test_config_rejects_a_width_below_one() -> None:
    with pytest.raises(ValueError, match="width"):
        MCTSConfig(width=0)


def test_config_defaults_are_the_papers_first_round_values() -> None:
    config = MCTSConfig()
    assert (config.c_puct, config.width, config.rollouts, config.max_depth) == (2.0, 5, 8, 16)


def test_uct_of_a_ppm_initialised_child_under_an_unvisited_parent_is_its_q() -> None:
    tree = make_tree(mode=SearchMode.PPM)
    step_a, _ = expand(tree, [STEP_A, STEP_B], ppm={STEP_A: -0.4, STEP_B: 0.3})
    assert (tree.root.visits, step_a.visits) == (0, 1)
    # ln(max(0, 1)) = 0: no exploration bonus while the parent's count lags its child's.
    assert tree.uct(step_a, tree.root) == pytest.approx(-0.4)


def test_scoring_text_of_an_intermediate_code_step_shows_no_output() -> None:
    tree = make_tree(mode=SearchMode.PPM)
    root = tree.select()
    assert root is not None
    [candidate] = tree.propose(root, [STEP_A])
    candidate.program_ok, candidate.output = True, "5\n"
    text = tree.scoring_text(root, candidate)
    assert text.endswith(f"{STEP_A}\n") and "<output>" not in text


def test_trajectories_include_an_answer_the_grader_could_not_judge() -> None:
    tree = make_tree()
    [step_a] = expand(tree, [STEP_A])
    [final] = expand(tree, [FINAL])
    node = tree.select()
    assert node is final
    [candidate] = tree.propose(node, [RIGHT])  # correct stays None: ungraded
    [answer] = tree.expand(node, [candidate])
    assert answer.correct is None
    assert tree.trajectories() == [[step_a, final, answer]]


def test_config_accepts_a_temperature_of_zero() -> None:
    assert MCTSConfig(temperature=0).temperature == 0
