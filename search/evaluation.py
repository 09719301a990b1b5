"""Evaluation modes on benchmark problems, run on the rollout machinery: greedy, maj@K, ppm@K, mcts.

- `greedy`: one chain at temperature 0 (pass@1).
- `maj@K`: K sampled chains; the answer most of them agree on (self-consistency).
- `ppm@K`: K sampled chains; the one the PPM rates best (rStar-Math's best-of-N, see `best_scored`).
- `mcts`: PPM-guided MCTS (`SearchMode.TEST_TIME`: the PPM, not the reference, rewards answers);
  the answer node with the highest value, which in that mode is the PPM's score of the answer.

A chain is an MCTS tree of width 1 and a single rollout: each expansion samples one step, so the tree
is one path from the question to an answer step or to a dead end (a failed program, a malformed
step, the depth limit). The K chains of a problem are K replicas of it (distinct ids, so distinct
tree RNGs) in one `run_rollouts` call: every pass samples the next step of all chains of all
problems in one generate call, and a generator samples each prompt of a call independently (its own
rows in a batch, its own request seed), so replicas are independent samples. Steps run in the same
sandbox and answers go through the same grader as in rollouts. Chains and trees are written in the
config's step format (`step_format`: rstar, or Satori's chain-of-action-thought), as in the search.

Samples are shared: `maj@K` and `ppm@K` with the same K judge the same K chains per problem, as
rStar-Math's evaluation does, so the two are compared on equal footing and sampled once (both
report the tokens and time of that sampling).

Each problem ends with one record: the chosen trajectory, its extracted answer, the grader's status
(`ok`, or `no_answer` / `timeout` / `checker_error`, counted apart from wrong answers) and whether
it is correct (only ever with status `ok`). Nothing here loads models or touches files.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from search.mcts import MCTSConfig, Node, NodeKind, SearchMode, Tree
from search.policy import Generator, StepScorer
from search.rollout import AnswerChecker, AnswerGrade, Executor, Problem, RolloutProgress, finite_scores, run_rollouts
from search.steps import Phase, StepFormat, render_prompt

NO_ANSWER = "no_answer"
"""Status of a problem whose chosen chain states no answer (none reached an answer step, or its
answer step names no extractable answer); the grader uses the same word."""


class ModeKind(StrEnum):
    GREEDY = "greedy"
    MAJORITY = "maj"
    PPM = "ppm"
    MCTS = "mcts"


MODE_FORMS = "greedy, maj@K, ppm@K or mcts (K a positive integer)"
_SAMPLED = (ModeKind.MAJORITY, ModeKind.PPM)


@dataclass(frozen=True)
class EvalMode:
    """An inference mode; `k` is the number of sampled chains of maj@K and ppm@K (1 otherwise)."""

    kind: ModeKind
    k: int = 1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"mode {self.kind.value}@{self.k}: K must be at least 1")
        if self.kind not in _SAMPLED and self.k != 1:
            raise ValueError(f"mode {self.kind.value} takes no K; use {MODE_FORMS}")

    @property
    def name(self) -> str:
        return f"{self.kind.value}@{self.k}" if self.kind in _SAMPLED else self.kind.value

    @property
    def needs_ppm(self) -> bool:
        return self.kind in (ModeKind.PPM, ModeKind.MCTS)

    @property
    def samples(self) -> bool:
        """Whether the mode draws several continuations that must differ (K chains, or a search's
        candidates): at temperature 0 they would all be the greedy one."""
        return self.kind is ModeKind.MCTS or (self.kind in _SAMPLED and self.k > 1)

    def __str__(self) -> str:
        return self.name


def parse_mode(text: str) -> EvalMode:
    """`greedy`, `maj@8`, `ppm@8` or `mcts` as an EvalMode; anything else is a ValueError naming the forms."""
    name = text.strip()
    if name in (ModeKind.GREEDY, ModeKind.MCTS):
        return EvalMode(ModeKind(name))
    kind, separator, k = name.partition("@")
    if separator and kind in _SAMPLED and k.isdigit() and int(k) >= 1:
        return EvalMode(ModeKind(kind), int(k))
    raise ValueError(f"unknown mode {text!r}; use {MODE_FORMS}")


@dataclass
class EvalSearchConfig:
    """How chains and test-time trees are generated."""

    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature of maj@K, ppm@K and mcts (greedy uses 0)"}
    )
    max_step_tokens: int = field(default=1024, metadata={"help": "token cap for one generated step"})
    max_depth: int = field(
        default=16, metadata={"help": "deepest step; a chain still going there ends without an answer"}
    )
    mcts_width: int = field(default=5, metadata={"help": "mcts mode: candidate steps per expansion"})
    mcts_rollouts: int = field(
        default=16, metadata={"help": "mcts mode: rollouts per problem (the paper's headline: 64)"}
    )
    c_puct: float = field(default=2.0, metadata={"help": "mcts mode: UCT exploration constant"})
    seed: int = field(default=0, metadata={"help": "seed of the generator and of the trees' tie breaking"})
    pipeline_groups: int = field(
        default=2, metadata={"help": "tree groups taking turns so code execution overlaps generation"}
    )
    step_format: StepFormat = field(
        default=StepFormat.RSTAR,
        metadata={"help": "the policy's step format: rstar, or coat (chain-of-action-thought, search.coat)"},
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.pipeline_groups < 1:
            raise ValueError(f"pipeline_groups must be >= 1, got {self.pipeline_groups}")
        self.step_format = self.mcts_config().step_format  # MCTSConfig names any other setting out of range

    def chain_config(self, temperature: float) -> MCTSConfig:
        """A width-1, one-rollout search: a single chain from the question to its end."""
        return MCTSConfig(
            width=1,
            rollouts=1,
            max_depth=self.max_depth,
            temperature=temperature,
            max_step_tokens=self.max_step_tokens,
            mode=SearchMode.TERMINAL,
            seed=self.seed,
            step_format=self.step_format,
        )

    def mcts_config(self) -> MCTSConfig:
        return MCTSConfig(
            c_puct=self.c_puct,
            width=self.mcts_width,
            rollouts=self.mcts_rollouts,
            max_depth=self.max_depth,
            temperature=self.temperature,
            max_step_tokens=self.max_step_tokens,
            mode=SearchMode.TEST_TIME,
            seed=self.seed,
            step_format=self.step_format,
        )


@dataclass(frozen=True)
class ProblemRecord:
    """The outcome of one problem in one mode."""

    problem_id: str
    prediction: str | None  # the chosen trajectory's solution text (steps, output, answer)
    extracted_answer: str | None
    status: str  # ok | no_answer | timeout | checker_error
    correct: bool
    tokens: int  # generated for this problem in this mode (all its chains or its whole tree)


@dataclass
class ModeResult:
    mode: EvalMode
    records: list[ProblemRecord]
    wall_seconds: float

    @property
    def correct(self) -> int:
        return sum(record.correct for record in self.records)

    @property
    def accuracy(self) -> float:
        """Correct over all problems: a problem without a gradable answer counts as not solved."""
        return self.correct / len(self.records) if self.records else 0.0

    @property
    def tokens(self) -> int:
        return sum(record.tokens for record in self.records)

    def outcome_counts(self) -> dict[str, int]:
        """Problems per outcome: `correct`, `wrong` (graded, not equal), and each other grader status."""
        counts = Counter(
            ("correct" if record.correct else "wrong") if record.status == "ok" else record.status
            for record in self.records
        )
        return dict(sorted(counts.items()))


ProgressCallback = Callable[[str, RolloutProgress], None]
"""Receives a label of the search under way ("greedy", "8 samples", "mcts") and its progress."""


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> int | None:
    """The index of the sample whose answer wins the vote, or None when no sample has an answer.

    Samples without an answer (None) do not vote; every other sample votes once. Distinct answers are
    taken the most written first (the earliest on ties), and each joins the first cluster whose every
    answer it is `equivalent` to, or starts its own. The largest cluster wins (on ties, the one with
    the earliest sample), and the pick is the first sample of the answer that started it. A grader's
    equivalence need not be transitive (it can take "10\\%" as both 0.1 and 10): an answer equal to
    two different ones joins the more written one, and cannot carry the other's votes into it.
    """
    counts: Counter[str] = Counter(answer for answer in answers if answer is not None)
    first = {}
    for index, answer in enumerate(answers):
        if answer is not None:
            first.setdefault(answer, index)
    clusters: list[list[str]] = []  # each started by its first answer
    for answer in sorted(counts, key=lambda a: (-counts[a], first[a])):
        home = next((cluster for cluster in clusters if all(equivalent(answer, other) for other in cluster)), None)
        if home is None:
            clusters.append([answer])
        else:
            home.append(answer)
    if not clusters:
        return None
    best = min(clusters, key=lambda cluster: (-sum(counts[a] for a in cluster), min(first[a] for a in cluster)))
    return first[best[0]]


def best_scored(scores: Sequence[float | None]) -> int | None:
    """The index of the highest score (None and NaN entries skipped), the earliest on ties; None if none is left.

    ppm@K follows rStar-Math's best-of-N: every chain that reaches an answer step is scored by the
    PPM as a whole, the text from the question through its answer step (what the PPM rates for an
    answer node during test-time search), and the chain with the highest score gives the answer.
    """
    best: int | None = None
    for index, score in enumerate(scores):
        # A NaN score ranks nowhere: compared with it every test is false, so it would win when first.
        if score is not None and not math.isnan(score) and (best is None or score > scores[best]):  # type: ignore[operator]
            best = index
    return best


def check_sampling(modes: Sequence[EvalMode], temperature: float) -> None:
    """ValueError naming the modes that sample, when `temperature` would make every sample the greedy one."""
    if temperature <= 0 and (sampling := [mode.name for mode in modes if mode.samples]):
        raise ValueError(f"mode(s) {', '.join(sampling)} sample several continuations and need a temperature above 0")


def evaluate_modes(
    problems: Sequence[Problem],
    modes: Sequence[EvalMode],
    config: EvalSearchConfig,
    *,
    generator: Generator,
    executor: Executor,
    checker: AnswerChecker,
    scorer: StepScorer | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[ModeResult]:
    """Evaluate `problems` in each of `modes`, in order; one result per mode.

    Raises ValueError for a PPM mode without `scorer`, or sampled modes at temperature 0 (their K
    chains would all be the greedy one).
    """
    if scorer is None and (needing := [mode.name for mode in modes if mode.needs_ppm]):
        raise ValueError(f"mode(s) {', '.join(needing)} need a PPM scorer")
    check_sampling(modes, config.temperature)
    evaluation = _Evaluation(problems, config, generator, executor, _GradeMemo(checker), scorer, on_progress)
    return [evaluation.run(mode) for mode in modes]


class _GradeMemo:
    """The checker, remembering every verdict: the answer finally picked was graded during the search."""

    def __init__(self, checker: AnswerChecker) -> None:
        self.checker = checker
        self.verdicts: dict[tuple[str, str], AnswerGrade] = {}

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[AnswerGrade]:
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self.verdicts]
        if missing:
            self.verdicts.update(zip(missing, self.checker.grade_many(missing), strict=True))
        return [self.verdicts[pair] for pair in pairs]


@dataclass
class _Searched:
    """Trees of every problem (K chains each, or one test-time tree), in problem order."""

    trees: list[list[Tree]]
    tokens: list[int]
    wall_seconds: float


@dataclass(frozen=True)
class _Pick:
    """The node a mode settled on for a problem: an answer node, or a dead end shown for the record."""

    tree: Tree
    leaf: Node


class _Evaluation:
    def __init__(
        self,
        problems: Sequence[Problem],
        config: EvalSearchConfig,
        generator: Generator,
        executor: Executor,
        grades: _GradeMemo,
        scorer: StepScorer | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.problems = list(problems)
        self.config = config
        self.generator = generator
        self.executor = executor
        self.grades = grades
        self.scorer = scorer
        self.on_progress = on_progress
        self._samples: dict[int, _Searched] = {}

    def run(self, mode: EvalMode) -> ModeResult:
        """The mode's records; its wall time is that of the search it judged plus its own picking."""
        searched = self._searched_for(mode)
        picking_started = time.perf_counter()
        if mode.kind is ModeKind.GREEDY:
            picks = [self._first_answer(chains) for chains in searched.trees]
        elif mode.kind is ModeKind.MCTS:
            picks = [self._best_answer_node(tree) for [tree] in searched.trees]
        elif mode.kind is ModeKind.MAJORITY:
            picks = self._vote(searched)
        else:
            picks = self._best_by_ppm(searched)
        records = self._records(picks, searched.tokens)
        return ModeResult(mode, records, searched.wall_seconds + time.perf_counter() - picking_started)

    # -- searching -------------------------------------------------------------------------------

    def _searched_for(self, mode: EvalMode) -> _Searched:
        if mode.kind is ModeKind.GREEDY:
            return self._search(self.config.chain_config(temperature=0.0), label="greedy", copies=1)
        if mode.kind is ModeKind.MCTS:
            return self._search(self.config.mcts_config(), label="mcts", copies=1)
        if mode.k not in self._samples:
            config = self.config.chain_config(self.config.temperature)
            self._samples[mode.k] = self._search(config, label=f"{mode.k} samples", copies=mode.k)
        return self._samples[mode.k]

    def _search(self, config: MCTSConfig, *, label: str, copies: int) -> _Searched:
        """`copies` trees per problem, all in one batched search."""
        # `#` and the copy number keep replica ids distinct from each other and from other problems' replicas.
        replicas = [
            Problem(f"{problem.problem_id}#{copy}" if copies > 1 else problem.problem_id, problem.question, problem.answer)
            for problem in self.problems
            for copy in range(copies)
        ]
        started = time.perf_counter()
        self.generator.restart_seeds()  # this mode's samples as if it ran alone
        result = run_rollouts(
            replicas,
            config,
            generator=self.generator,
            executor=self.executor,
            checker=self.grades,
            scorer=self.scorer if config.uses_ppm else None,
            pipeline_groups=self.config.pipeline_groups,
            on_progress=(lambda progress: self.on_progress(label, progress)) if self.on_progress else None,
        )
        trees = [result.trees[start : start + copies] for start in range(0, len(result.trees), copies)]
        tokens = [sum(result.tokens_by_problem[tree.problem_id] for tree in group) for group in trees]
        return _Searched(trees, tokens, time.perf_counter() - started)

    # -- picking ---------------------------------------------------------------------------------

    @staticmethod
    def _answer_leaf(tree: Tree) -> Node | None:
        """The answer a chain ended in, if it ended in one."""
        return next((node for node in tree.nodes if node.kind is NodeKind.ANSWER), None)

    def _first_answer(self, chains: list[Tree]) -> _Pick:
        [chain] = chains
        return _Pick(chain, self._answer_leaf(chain) or chain.nodes[-1])

    def _best_answer_node(self, tree: Tree) -> _Pick:
        leaves = [node for node in tree.nodes if node.kind is NodeKind.ANSWER]
        # An answer step with nothing gradable in it is picked only when no step has an answer.
        answers = [node for node in leaves if node.answer is not None] or leaves
        best = best_scored([node.q_value for node in answers])
        return _Pick(tree, answers[best] if best is not None else tree.nodes[-1])

    def _vote(self, searched: _Searched) -> list[_Pick]:
        answers = [[self._extracted(chain) for chain in chains] for chains in searched.trees]
        same = self._equivalences(answers)
        picks = []
        for chains, problem_answers in zip(searched.trees, answers, strict=True):
            winner = majority_vote(problem_answers, lambda a, b: a == b or same.get((a, b), same.get((b, a), False)))
            picks.append(self._chain_pick(chains, winner))
        return picks

    def _extracted(self, chain: Tree) -> str | None:
        leaf = self._answer_leaf(chain)
        return leaf.answer if leaf is not None else None

    def _equivalences(self, answers: list[list[str | None]]) -> dict[tuple[str, str], bool]:
        """Grader equivalence of every later distinct answer with every earlier one, all problems in one call."""
        pairs: list[tuple[str, str]] = []
        for problem_answers in answers:
            distinct = list(dict.fromkeys(answer for answer in problem_answers if answer is not None))
            pairs += [(later, earlier) for i, later in enumerate(distinct) for earlier in distinct[:i]]
        # Boxed, the answer is extracted back exactly as it is; a verdict other than "ok" counts as different.
        # Both directions must agree: math-verify's leniencies are one-sided ("10\\%" takes 0.1 and 10,
        # which are not the same answer), and one-sided equality would let a cluster absorb both.
        directed = [*pairs, *((earlier, later) for later, earlier in pairs)]
        verdicts = self.grades.grade_many([(f"\\boxed{{{a}}}", b) for a, b in directed]) if pairs else []
        equal = [verdict.equal and verdict.status == "ok" for verdict in verdicts]
        return {pair: equal[i] and equal[i + len(pairs)] for i, pair in enumerate(pairs)}

    def _best_by_ppm(self, searched: _Searched) -> list[_Pick]:
        assert self.scorer is not None
        answered = [
            (p, c, chain.prompt(leaf))
            for p, chains in enumerate(searched.trees)
            for c, chain in enumerate(chains)
            if (leaf := self._answer_leaf(chain)) is not None
        ]
        # A broken PPM stops the evaluation, as it stops the search: a best-of-K that skipped its NaN
        # scores would report the first chain's accuracy as the PPM's.
        values = finite_scores(self.scorer.score([text for _, _, text in answered])) if answered else []
        scores: list[list[float | None]] = [[None] * len(chains) for chains in searched.trees]
        for (p, c, _), value in zip(answered, values, strict=True):
            scores[p][c] = value
        picks = []
        for chains, row in zip(searched.trees, scores, strict=True):
            # Chains whose answer step holds a gradable answer first, as in `_best_answer_node`.
            gradable = [score if self._extracted(chain) is not None else None for chain, score in zip(chains, row)]
            best = best_scored(gradable)
            picks.append(self._chain_pick(chains, best if best is not None else best_scored(row)))
        return picks

    def _chain_pick(self, chains: list[Tree], chosen: int | None) -> _Pick:
        if chosen is None:  # no chain has an answer: show the first one's dead end
            return _Pick(chains[0], chains[0].nodes[-1])
        leaf = self._answer_leaf(chains[chosen])
        assert leaf is not None
        return _Pick(chains[chosen], leaf)

    # -- records ---------------------------------------------------------------------------------

    def _records(self, picks: Sequence[_Pick], tokens: Sequence[int]) -> list[ProblemRecord]:
        answered = [
            (i, pick.tree.parse(pick.leaf.step, Phase.ANSWER).answer_text or "")
            for i, pick in enumerate(picks)
            if pick.leaf.kind is NodeKind.ANSWER
        ]
        pairs = [(text, self.problems[i].answer) for i, text in answered]
        verdicts = self.grades.grade_many(pairs) if pairs else []
        grade_of = {i: verdict for (i, _), verdict in zip(answered, verdicts, strict=True)}
        records = []
        for i, (problem, pick) in enumerate(zip(self.problems, picks, strict=True)):
            grade = grade_of.get(i)
            records.append(
                ProblemRecord(
                    problem_id=problem.problem_id,
                    prediction=_solution_text(pick.tree, pick.leaf) if pick.leaf.parent_id >= 0 else None,
                    extracted_answer=grade.pred_answer if grade else None,
                    status=grade.status if grade else NO_ANSWER,
                    correct=bool(grade and grade.equal and grade.status == "ok"),
                    tokens=tokens[i],
                )
            )
        return records


def _solution_text(tree: Tree, leaf: Node) -> str:
    """The solution from the first step through `leaf`, as the policy wrote it (without the prompt)."""
    return tree.prompt(leaf).removeprefix(render_prompt(tree.question))
