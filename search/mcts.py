"""Monte Carlo tree search over code-augmented steps, one tree per problem (rStar-Math).

Pure bookkeeping: no model, sandbox, grader or files. A driver (`search.rollout`) asks each tree
which node to expand (`select`), samples candidate steps for it (`prompt`, `propose`), evaluates
them (runs their programs, grades answers, asks the PPM) and hands them back (`expand`).

A rollout walks from the root to a terminal node, one expansion at a time, as in rStar-Math:
selection descends by UCT, `Q(s) + c * sqrt(ln N(parent) / N(s))`, visiting unvisited children
first (ties broken by the tree's RNG) and skipping subtrees with nothing left to expand. The node
reached is expanded with up to `width` distinct candidates; the rollout then continues into the
best new child and ends when an expansion yields only terminal children. The tree is done after
`rollouts` rollouts or when nothing is left to expand.

Rewards. An answer node gets +1 when it is verified (its answer matches the reference and, when the
reference is a plain number and its program printed a number, so does that number, rounded to the
reference's places where the question asks for rounding: `search.rollout.verified`) and -1 otherwise
(in test-time mode its PPM score instead), back-propagated to the root when the node is created: `q += reward`,
`N += 1` along the path, `Q = q / N`. Nodes that cannot continue are dropped, as the official rStar
code does with its structural failures: an `error` node (its program failed in the sandbox or printed
an error, `search.rollout.printed_error`, or the step is malformed) and a `depth_limit` node (a non-final step at the maximum depth) get `Q = -1`
for themselves (`q = -1`, `N = 1`) and change nothing above them, so a step's Q reflects only the
answers reached through it, not how many broken continuations were sampled below it. An answer the
grader could not judge (a timeout or a checker failure: `correct` is None) changes nothing either,
and has no value of its own. A final code step is never cut by the depth limit: only its answer can follow, one
level deeper. In PPM-augmented modes a new non-terminal node starts at `q = PPM score`, `N = 1`,
without propagating that to its ancestors.

Step formats. In `rstar` a step is a code-augmented step (`search.steps`) and its program is the code
of its whole path, unless the path went back (ASTRO's backtrack step, `search.coat.astro_backtrack`).
In `coat` (Satori's chain-of-action-thought, `search.coat`) every step opens with
a meta-action token, and a node's `step` keeps the token, so prompts and PPM texts are COAT as they
stand. A step's program is the code of its live path: `<|reflect|>` and `<|explore|>` steps roll
earlier steps back, and such a meta step (a comment) runs the rolled-back program, becoming an
ordinary non-terminal node. The answer comes after the live path's final code step. An rstar path
is a COAT path whose steps all continue but its backtracks, which reflect, so both formats share
every line below.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from search.coat import (
    CoatStep,
    as_coat_step,
    live_path,
    parse_coat_step,
    parse_plain_step,
    plain_coat_steps,
    step_program,
)
from search.steps import (
    ParsedStep,
    Phase,
    SolutionStep,
    StepFormat,
    StepKind,
    parse_step,
    render_trajectory,
)

CORRECT_REWARD = 1.0
WRONG_REWARD = -1.0


class SearchMode(StrEnum):
    TERMINAL = "terminal"  # rounds 1-2: only terminal rewards guide the search
    PPM = "ppm"  # from round 3: the PPM initialises the Q of new non-terminal nodes
    TEST_TIME = "test_time"  # as PPM, and the PPM (not the reference) scores answer nodes


class NodeKind(StrEnum):
    ROOT = "root"
    STEP = "step"
    ANSWER = "answer"
    ERROR = "error"
    DEPTH_LIMIT = "depth_limit"


TERMINAL_KINDS = frozenset({NodeKind.ANSWER, NodeKind.ERROR, NodeKind.DEPTH_LIMIT})

MALFORMED_STEP_ERROR = "the step is not in the step format"

NODE_COLUMNS: tuple[str, ...] = (
    "run",
    "round",
    "problem_id",
    "node_id",
    "parent_id",
    "depth",
    "step",
    "code",
    "output",
    "error",
    "kind",
    "answer",
    "correct",
    "visits",
    "q_value",
    "ppm_score",
)
"""Columns of the `nodes` table, in order, as produced by `Tree.node_rows`."""


@dataclass
class MCTSConfig:
    c_puct: float = field(default=2.0, metadata={"help": "UCT exploration constant c (rStar-Math: 2)"})
    width: int = field(
        default=5, metadata={"help": "candidate steps sampled per expansion, k (paper: 5 in round 1, 8 later)"}
    )
    rollouts: int = field(default=8, metadata={"help": "rollouts per problem (paper: 8 in round 1, 16 later)"})
    max_depth: int = field(
        default=16,
        metadata={"help": "deepest step; a non-final code step there becomes depth_limit (a final one may still answer)"},
    )
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the policy"})
    max_step_tokens: int = field(default=1024, metadata={"help": "token cap for one generated step"})
    mode: SearchMode = field(
        default=SearchMode.TERMINAL,
        metadata={
            "help": "terminal (rounds 1-2), ppm (PPM initialises node Q, round 3+), test_time (PPM also scores answers)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the per-tree RNGs (tie breaking among equal UCT values)"})
    step_format: StepFormat = field(
        default=StepFormat.RSTAR,
        metadata={"help": "rstar (code-augmented steps) or coat (each step led by <|continue|>, <|reflect|> or "
                  "<|explore|>; a step without one is malformed)"},
    )

    def __post_init__(self) -> None:
        self.mode = SearchMode(self.mode)
        if self.step_format not in tuple(StepFormat):
            raise ValueError(
                f"MCTSConfig.step_format must be one of {', '.join(StepFormat)}, got {self.step_format!r}"
            )
        self.step_format = StepFormat(self.step_format)
        for name in ("width", "rollouts", "max_depth", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"MCTSConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.c_puct < 0:
            raise ValueError(f"MCTSConfig.c_puct must be >= 0, got {self.c_puct}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"MCTSConfig.temperature must be finite and >= 0, got {self.temperature}")

    @property
    def uses_ppm(self) -> bool:
        return self.mode is not SearchMode.TERMINAL


@dataclass(eq=False)
class Node:
    node_id: int
    parent_id: int
    depth: int
    kind: NodeKind
    step: str = ""
    code: str = ""
    output: str | None = None
    error: str | None = None
    answer: str | None = None
    correct: bool | None = None
    ppm_score: float | None = None
    visits: int = 0
    value_sum: float = 0.0
    is_final_code: bool = False  # a final code step: its output is shown, an answer step may follow
    exhausted: bool = False  # terminal, or every child exhausted: selection skips it
    children: list[Node] = field(default_factory=list, repr=False)

    @property
    def q_value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    @property
    def is_terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


@dataclass(eq=False)
class Candidate:
    """A sampled step before it joins the tree. The driver fills in the evaluation fields."""

    step: str
    parsed: ParsedStep
    depth: int
    program: str | None  # the live path's program to run in the sandbox; None when there is nothing to run
    at_max_depth: bool
    program_ok: bool | None = None
    output: str | None = None
    error: str | None = None  # why the program failed: the sandbox's error, or the error line it printed
    answer: str | None = None
    correct: bool | None = None
    ppm_score: float | None = None

    @property
    def kind(self) -> NodeKind:
        if self.parsed.kind is StepKind.MALFORMED:
            return NodeKind.ERROR
        if self.parsed.kind is StepKind.ANSWER:
            return NodeKind.ANSWER
        if self.program_ok is None:
            raise ValueError("a code step's kind is known only after its program ran")
        if not self.program_ok:
            return NodeKind.ERROR
        return NodeKind.DEPTH_LIMIT if self.at_max_depth else NodeKind.STEP


class Tree:
    """The search tree of one problem; node ids are creation order, the root is 0."""

    def __init__(self, problem_id: str, question: str, config: MCTSConfig, rng: random.Random) -> None:
        self.problem_id = problem_id
        self.question = question
        self.config = config
        self.rng = rng
        self.nodes: list[Node] = [Node(node_id=0, parent_id=-1, depth=0, kind=NodeKind.ROOT)]
        self.rollouts_done = 0
        self._cursor: Node | None = None  # where the current rollout stands

    @property
    def root(self) -> Node:
        return self.nodes[0]

    @property
    def finished(self) -> bool:
        return self.root.exhausted or self.rollouts_done >= self.config.rollouts

    # -- selection ---------------------------------------------------------------------------

    def select(self) -> Node | None:
        """The node the current rollout expands next (starting a rollout if none is under way).

        Returns None once the tree is finished. Calling it again before `expand` returns the
        same node.
        """
        if self.finished:
            return None
        node = self._cursor or self.root
        while node.children:
            node = self._pick_child(node)
        self._cursor = node
        return node

    def uct(self, node: Node, parent: Node) -> float:
        if node.visits == 0:
            return math.inf
        # A parent's count can lag its children's when PPM initialisation gave them a visit.
        exploration = math.sqrt(math.log(max(parent.visits, 1)) / node.visits)
        return node.q_value + self.config.c_puct * exploration

    def _pick_child(self, node: Node) -> Node:
        open_children = [child for child in node.children if not child.exhausted]
        scores = [self.uct(child, node) for child in open_children]
        best = max(scores)
        return self.rng.choice([child for child, score in zip(open_children, scores, strict=True) if score == best])

    # -- expansion ---------------------------------------------------------------------------

    @staticmethod
    def _child_phase(path_steps: Sequence[CoatStep]) -> Phase:
        """What a child of the path's last node is: the answer once the live path ends in a final code step."""
        live = live_path(path_steps)
        return Phase.ANSWER if live and parse_step(live[-1].text).kind is StepKind.FINAL_CODE else Phase.STEP

    def parse(self, text: str, phase: Phase | None = None) -> ParsedStep:
        """Classify a generated step in the tree's step format (in coat, the step after its token)."""
        if self.config.step_format is StepFormat.COAT:
            return parse_coat_step(text, phase)[1]
        return parse_plain_step(text, phase)

    def _coat_steps(self, texts: Sequence[str]) -> list[CoatStep]:
        """Well-formed steps as COAT steps: in the rstar format, every step continues the solution but
        an ASTRO backtrack, which rolls it back (`search.coat.plain_coat_steps`)."""
        if self.config.step_format is StepFormat.COAT:
            return [as_coat_step(text) for text in texts]
        return plain_coat_steps([SolutionStep(text) for text in texts])

    def path(self, node: Node) -> list[Node]:
        """The nodes from the first step down to `node` (the root excluded)."""
        path: list[Node] = []
        while node.parent_id >= 0:
            path.append(node)
            node = self.nodes[node.parent_id]
        return path[::-1]

    def prompt(self, node: Node) -> str:
        """The text the policy continues to propose children of `node`."""
        return render_trajectory(self.question, [self._solution_step(n) for n in self.path(node)])

    def propose(self, node: Node, texts: Sequence[str]) -> list[Candidate]:
        """Turn sampled continuations of `node` into candidates: identical samples collapse into one."""
        ancestors = self._coat_steps([n.step for n in self.path(node)])
        phase = self._child_phase(ancestors)
        depth = node.depth + 1
        seen: set[str] = set()
        candidates = []
        for text in texts:
            if text.strip() in seen:
                continue
            seen.add(text.strip())
            parsed = self.parse(text, phase)
            program = step_program([*ancestors, *self._coat_steps([text])]) if parsed.code is not None else None
            at_max_depth = depth >= self.config.max_depth and parsed.kind is not StepKind.FINAL_CODE
            candidates.append(Candidate(text, parsed, depth=depth, program=program, at_max_depth=at_max_depth))
        return candidates

    def needs_ppm_score(self, candidate: Candidate) -> bool:
        if candidate.kind is NodeKind.STEP:
            return self.config.uses_ppm
        return candidate.kind is NodeKind.ANSWER and self.config.mode is SearchMode.TEST_TIME

    def scoring_text(self, node: Node, candidate: Candidate) -> str:
        """What the PPM scores for a candidate child of `node`: the trajectory ending in it."""
        steps = [self._solution_step(n) for n in self.path(node)]
        output = candidate.output if candidate.parsed.kind is StepKind.FINAL_CODE else None
        return render_trajectory(self.question, [*steps, SolutionStep(candidate.step, output)])

    def expand(self, node: Node, candidates: Sequence[Candidate]) -> list[Node]:
        """Attach evaluated candidates under `node` (from `select`), back up terminal rewards, move the rollout on."""
        if node is not self._cursor or node.children:
            raise ValueError(f"node {node.node_id} is not the pending expansion of tree {self.problem_id!r}")
        children = [self._attach(node, candidate) for candidate in candidates]
        self._mark_exhausted_upwards(node)
        if node.exhausted:
            self.rollouts_done += 1
            self._cursor = None
        return children

    def _attach(self, parent: Node, candidate: Candidate) -> Node:
        kind = candidate.kind
        if self.needs_ppm_score(candidate) and candidate.ppm_score is None:
            raise ValueError(f"{self.config.mode} search needs a PPM score for every new {kind} node")
        child = Node(
            node_id=len(self.nodes),
            parent_id=parent.node_id,
            depth=candidate.depth,
            kind=kind,
            step=candidate.step,
            code=candidate.parsed.code or "",
            output=candidate.output,
            error=MALFORMED_STEP_ERROR if candidate.parsed.kind is StepKind.MALFORMED else candidate.error,
            answer=candidate.answer,
            correct=candidate.correct,
            ppm_score=candidate.ppm_score,
            is_final_code=kind is NodeKind.STEP and candidate.parsed.kind is StepKind.FINAL_CODE,
            exhausted=kind in TERMINAL_KINDS,
        )
        self.nodes.append(child)
        parent.children.append(child)
        if kind is NodeKind.ANSWER:
            reward = self._answer_reward(child)
            if reward is not None:
                self._backpropagate(child, reward)
        elif child.is_terminal:
            child.visits, child.value_sum = 1, WRONG_REWARD
        elif child.ppm_score is not None:
            child.visits, child.value_sum = 1, child.ppm_score
        return child

    def _answer_reward(self, node: Node) -> float | None:
        """The reward an answer node backs up; None for an answer the grader could not judge."""
        if self.config.mode is SearchMode.TEST_TIME:
            assert node.ppm_score is not None
            return node.ppm_score
        if node.correct is None:
            return None
        return CORRECT_REWARD if node.correct else WRONG_REWARD

    def _backpropagate(self, node: Node, reward: float) -> None:
        while True:
            node.visits += 1
            node.value_sum += reward
            if node.parent_id < 0:
                return
            node = self.nodes[node.parent_id]

    def _mark_exhausted_upwards(self, node: Node) -> None:
        while all(child.exhausted for child in node.children):
            node.exhausted = True
            if node.parent_id < 0:
                return
            node = self.nodes[node.parent_id]

    def _solution_step(self, node: Node) -> SolutionStep:
        return SolutionStep(node.step, node.output if node.is_final_code else None)

    # -- results -----------------------------------------------------------------------------

    def trajectories(self) -> list[list[Node]]:
        """Every root-to-answer path (root excluded), in the order the answers were found."""
        return [self.path(node) for node in self.nodes if node.kind is NodeKind.ANSWER]

    def node_rows(self, run: str, round: int) -> list[dict[str, object]]:
        """One row per node for the `nodes` table, with exactly the columns of NODE_COLUMNS."""
        return [
            {
                "run": run,
                "round": round,
                "problem_id": self.problem_id,
                "node_id": node.node_id,
                "parent_id": node.parent_id,
                "depth": node.depth,
                "step": node.step,
                "code": node.code,
                "output": node.output,
                "error": node.error,
                "kind": node.kind.value,
                "answer": node.answer,
                "correct": node.correct,
                "visits": node.visits,
                "q_value": node.q_value,
                "ppm_score": node.ppm_score,
            }
            for node in self.nodes
        ]
