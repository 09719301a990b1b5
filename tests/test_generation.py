"""The in-process transformers backend against the `Generator` contract, on a tiny random model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from models.generation import HFGenerator, PrefixKVCache, _invert_cdf, _sample_tokens
from models.tiny import ModelLoadError, build_tiny_model, default_corpus
from search.policy import Completion, PromptSeeds
from search.steps import render_prompt

# Different lengths, so batches need left padding.
PROMPTS = [
    render_prompt("What is 2 + 2?"),
    render_prompt("A train travels 120 km in 2 hours and then 60 km in 1 hour. What is its average speed?"),
    render_prompt("Find x if 3x = 12."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = default_corpus(include_shared=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus, num_layers=2)


@pytest.fixture(scope="module")
def generator(model_dir: Path) -> HFGenerator:
    return HFGenerator(model_dir, batch_size=8)


def greedy(generator: HFGenerator, prompts: list[str], *, stop: list[str] = (), max_tokens: int = 24):
    return generator.generate(prompts, n=1, stop=list(stop), temperature=0.0, max_tokens=max_tokens)


def first_stop_cut(text: str, stop: str) -> str:
    return text[: text.index(stop) + len(stop)]


def pick_stop(text: str, *, after: int) -> str:
    """A 3-character printable ASCII piece of `text` whose first occurrence starts at `after` or later."""
    return next(
        piece
        for start in range(after, len(text) - 3)
        if (piece := text[start : start + 3]).isascii() and piece.isprintable() and text.find(piece) == start
    )


def record_forwards(generator: HFGenerator, pick) -> list[int]:
    """From now on, `pick(new positions, attention width)` of each forward pass, where it is not None."""
    picked: list[int] = []
    forward = generator.model.forward

    def recording(*args, **kwargs):
        value = pick(kwargs["input_ids"].shape[1], kwargs["attention_mask"].shape[1])
        if value is not None:
            picked.append(value)
        return forward(*args, **kwargs)

    generator.model.forward = recording
    return picked


def test_returns_n_completions_for_every_prompt(generator: HFGenerator) -> None:
    completions = generator.generate(PROMPTS, n=3, stop=[], temperature=1.0, max_tokens=5)
    assert [len(samples) for samples in completions] == [3, 3, 3]


def test_no_prompts_gives_no_completions(generator: HFGenerator) -> None:
    assert generator.generate([], n=2, stop=[], temperature=1.0, max_tokens=5) == []


def test_greedy_batch_matches_each_prompt_alone(generator: HFGenerator) -> None:
    batched = greedy(generator, PROMPTS)
    assert batched == [greedy(generator, [prompt])[0] for prompt in PROMPTS]


def test_greedy_matches_transformers_generate(generator: HFGenerator) -> None:
    """The own decoding loop (cache appended in place, rows leaving the batch) against the library's."""
    completions = greedy(generator, PROMPTS, max_tokens=30)
    for prompt, samples in zip(PROMPTS, completions):
        ids = generator.tokenizer(prompt, return_tensors="pt")["input_ids"]
        reference = generator.model.generate(ids, do_sample=False, max_new_tokens=30)
        assert samples[0].text == generator.tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_does_not_depend_on_batch_size(model_dir: Path, generator: HFGenerator) -> None:
    one_at_a_time = HFGenerator(model_dir, batch_size=1)
    assert greedy(one_at_a_time, PROMPTS) == greedy(generator, PROMPTS)


def test_greedy_samples_of_one_prompt_are_identical(generator: HFGenerator) -> None:
    samples = generator.generate(PROMPTS[:1], n=3, stop=[], temperature=0.0, max_tokens=8)[0]
    assert samples == [samples[0]] * 3


def test_samples_decode_from_the_shared_prompt_cache_like_greedy(generator: HFGenerator) -> None:
    """Samples reuse one prefill per prompt; near temperature 0 each must follow the greedy path
    (which prefills every row itself), so positions and padding of the shared cache are right."""
    sampled = generator.generate(PROMPTS, n=3, stop=[], temperature=1e-6, max_tokens=24)
    assert [[c.text for c in samples] for samples in sampled] == [
        [samples[0].text] * 3 for samples in greedy(generator, PROMPTS)
    ]


def test_completion_without_stop_or_eos_runs_to_max_tokens(generator: HFGenerator) -> None:
    completion = greedy(generator, PROMPTS[:1], max_tokens=7)[0][0]
    assert (completion.num_tokens, completion.finish_reason) == (7, "length")


def test_stop_string_ends_the_completion_and_is_included(generator: HFGenerator) -> None:
    full = greedy(generator, PROMPTS[:1], max_tokens=40)[0][0].text
    stop = pick_stop(full, after=8)
    completion = greedy(generator, PROMPTS[:1], stop=[stop], max_tokens=40)[0][0]
    assert completion.text == first_stop_cut(full, stop)
    assert completion.finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins(generator: HFGenerator) -> None:
    full = greedy(generator, PROMPTS[:1], max_tokens=40)[0][0].text
    early = pick_stop(full, after=4)
    late = pick_stop(full, after=full.index(early) + 6)
    completion = greedy(generator, PROMPTS[:1], stop=[late, early], max_tokens=40)[0][0]
    assert completion.text == first_stop_cut(full, early)


def test_num_tokens_is_the_shortest_generation_containing_the_stop(generator: HFGenerator) -> None:
    full = greedy(generator, PROMPTS[:1], max_tokens=40)[0][0].text
    stop = pick_stop(full, after=8)
    stopped = greedy(generator, PROMPTS[:1], stop=[stop], max_tokens=40)[0][0]
    assert stop in greedy(generator, PROMPTS[:1], max_tokens=stopped.num_tokens)[0][0].text
    assert stop not in greedy(generator, PROMPTS[:1], max_tokens=stopped.num_tokens - 1)[0][0].text


def test_stop_string_in_the_prompt_does_not_stop_generation(generator: HFGenerator) -> None:
    full = greedy(generator, PROMPTS[:1], max_tokens=40)[0][0].text
    stop = pick_stop(full, after=8)
    prompt_ending_in_stop = PROMPTS[0] + stop
    unstopped = greedy(generator, [prompt_ending_in_stop], max_tokens=20)[0][0].text
    completion = greedy(generator, [prompt_ending_in_stop], stop=[stop], max_tokens=20)[0][0]
    assert completion.text == (first_stop_cut(unstopped, stop) if stop in unstopped else unstopped)


def test_rows_that_stop_early_do_not_disturb_the_others(generator: HFGenerator) -> None:
    full = [samples[0].text for samples in greedy(generator, PROMPTS, max_tokens=30)]
    stop = pick_stop(full[0], after=6)
    stopped = [samples[0].text for samples in greedy(generator, PROMPTS, stop=[stop], max_tokens=30)]
    assert stopped == [first_stop_cut(text, stop) if stop in text else text for text in full]


def test_eos_ends_the_completion_is_counted_and_not_in_the_text(model_dir: Path, tmp_path: Path) -> None:
    # Declare a token that greedy decoding produces early to be EOS, so the random model "finishes".
    reference = HFGenerator(model_dir)
    prompt_ids = reference.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    generated = reference.model.generate(prompt_ids, do_sample=False, max_new_tokens=6)[0, prompt_ids.shape[1] :].tolist()
    eos = generated[3]
    eos_index = generated.index(eos)
    patched = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((patched / "generation_config.json").read_text())
    (patched / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    completion = greedy(HFGenerator(patched), PROMPTS[:1], max_tokens=20)[0][0]
    assert completion.text == reference.tokenizer.decode(generated[:eos_index], skip_special_tokens=True)
    assert (completion.num_tokens, completion.finish_reason) == (eos_index + 1, "stop")


def test_the_tokenizers_eos_stops_generation_as_well_as_the_generation_configs(model_dir: Path, tmp_path: Path) -> None:
    """vLLM stops at both; a checkpoint whose generation config names another EOS must not run on past it."""
    patched = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((patched / "generation_config.json").read_text())
    (patched / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    generator = HFGenerator(patched)
    assert generator._eos_ids == {7, generator.tokenizer.eos_token_id}


def test_a_prompt_that_fills_the_context_gets_a_cut_off_completion(model_dir: Path) -> None:
    generator = HFGenerator(model_dir)
    generator.context_length = len(generator.tokenizer(PROMPTS[0])["input_ids"])
    assert greedy(generator, PROMPTS[:1]) == [[Completion("", 0, "length")]]


def test_output_stops_where_the_context_ends(model_dir: Path) -> None:
    generator = HFGenerator(model_dir)
    unbounded = greedy(generator, PROMPTS[:1], max_tokens=8)[0][0]
    generator.context_length = len(generator.tokenizer(PROMPTS[0])["input_ids"]) + 3
    assert unbounded.num_tokens > 3
    assert greedy(generator, PROMPTS[:1], max_tokens=8)[0][0].num_tokens == 3


def test_an_empty_prompt_is_refused(generator: HFGenerator) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        greedy(generator, [""])


def test_seeded_sampling_replays(model_dir: Path) -> None:
    def two_calls(seed: int):
        sampler = HFGenerator(model_dir, seed=seed)
        return [sampler.generate(PROMPTS, n=2, stop=[], temperature=1.0, max_tokens=8) for _ in range(2)]

    assert two_calls(seed=7) == two_calls(seed=7)


def test_different_seeds_sample_differently(model_dir: Path) -> None:
    samples = [HFGenerator(model_dir, seed=seed).generate(PROMPTS, n=2, stop=[], temperature=1.0, max_tokens=8) for seed in (1, 2)]
    assert samples[0] != samples[1]


def test_a_prompts_samples_do_not_depend_on_the_other_prompts_of_the_call(model_dir: Path) -> None:
    alone = HFGenerator(model_dir, seed=3).generate(PROMPTS[1:2], n=3, stop=[], temperature=1.0, max_tokens=8)
    together = HFGenerator(model_dir, seed=3).generate(PROMPTS, n=3, stop=[], temperature=1.0, max_tokens=8)
    assert together[1] == alone[0]


def test_a_prompts_samples_do_not_depend_on_the_batch_size(model_dir: Path) -> None:
    def sampled(batch_size: int) -> list:
        return HFGenerator(model_dir, seed=3, batch_size=batch_size).generate(
            PROMPTS, n=2, stop=[], temperature=1.0, max_tokens=8)

    assert sampled(2) == sampled(64)


def test_a_prompt_sampled_again_gets_fresh_samples(model_dir: Path) -> None:
    generator = HFGenerator(model_dir, seed=3)
    first, second = (generator.generate(PROMPTS[:1], n=4, stop=[], temperature=1.0, max_tokens=10) for _ in range(2))
    assert first != second


def test_samples_of_one_prompt_differ(generator: HFGenerator) -> None:
    samples = generator.generate(PROMPTS[:1], n=4, stop=[], temperature=1.0, max_tokens=10)[0]
    assert len({sample.text for sample in samples}) > 1


def test_sampling_leaves_the_global_torch_rng_alone(generator: HFGenerator) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generator.generate(PROMPTS[:1], n=2, stop=[], temperature=1.0, max_tokens=4)
    assert torch.equal(torch.rand(3), expected)


def test_missing_model_directory_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        HFGenerator(tmp_path / "missing")


def test_rows_left_after_the_longest_prompt_stops_decode_as_if_alone(generator: HFGenerator) -> None:
    """The longest prompt's row finishes first: the padding columns only it needed leave the cache
    with it, and the other rows' positions and masks must stay right."""
    longest = max(range(len(PROMPTS)), key=lambda index: len(PROMPTS[index]))
    full = [samples[0].text for samples in greedy(generator, PROMPTS, max_tokens=30)]
    others = [text for index, text in enumerate(full) if index != longest]
    stop = next(
        piece
        for start in range(2, len(full[longest]) - 3)
        if (piece := full[longest][start : start + 3]).isprintable()
        and full[longest].find(piece) == start
        and not any(piece in text for text in others)
    )
    stopped = [samples[0].text for samples in greedy(generator, PROMPTS, stop=[stop], max_tokens=30)]
    assert stopped[longest] == first_stop_cut(full[longest], stop)
    assert [text for index, text in enumerate(stopped) if index != longest] == others


def test_padding_only_the_longest_prompt_needed_leaves_with_its_row(model_dir: Path) -> None:
    """Once the longest prompt's row has stopped, decoding steps attend over fewer positions."""
    generator = HFGenerator(model_dir)
    longest = max(range(len(PROMPTS)), key=lambda index: len(PROMPTS[index]))
    text = greedy(generator, [PROMPTS[longest]], max_tokens=30)[0][0].text
    stop = pick_stop(text, after=2)
    widths = record_forwards(generator, lambda new, width: width if new == 1 else None)  # decoding steps
    greedy(generator, PROMPTS, stop=[stop], max_tokens=30)
    assert any(later < earlier for earlier, later in zip(widths, widths[1:]))


# --- reusing the states of earlier prompts -----------------------------------------------------------

STEP = "# add the numbers\nx = 2 + 2\n<end_of_step>\n"


def prefill_lengths(generator: HFGenerator) -> list[int]:
    """Record the number of new positions of every forward pass with more than one (the prefills)."""
    return record_forwards(generator, lambda new, width: new if new > 1 else None)


def test_a_prompt_extending_an_earlier_one_prefills_only_its_new_tokens(model_dir: Path) -> None:
    generator = HFGenerator(model_dir)
    greedy(generator, PROMPTS[:1], max_tokens=4)
    earlier, extended = (generator.tokenizer(text)["input_ids"] for text in (PROMPTS[0], PROMPTS[0] + STEP))
    assert extended[: len(earlier)] == earlier  # the step starts a new token
    prefills = prefill_lengths(generator)
    greedy(generator, [PROMPTS[0] + STEP], max_tokens=4)
    # The cache holds all of the earlier prompt but its last token (which ran per row), so that
    # token and the step's are what is left to prefill.
    assert prefills == [len(extended) - len(earlier)]


def test_a_repeated_prompt_is_not_prefilled_again(model_dir: Path) -> None:
    generator = HFGenerator(model_dir)
    greedy(generator, PROMPTS, max_tokens=4)
    prefills = prefill_lengths(generator)
    greedy(generator, PROMPTS, max_tokens=4)
    assert prefills == []


def test_reused_states_give_the_completions_of_a_fresh_prefill(model_dir: Path) -> None:
    """Calls as a search makes them (prompts extending the previous call's, next to new ones, so the
    rows reuse prefixes of different lengths in one batch) give what a generator without reuse gives."""
    calls = [PROMPTS[:2], [PROMPTS[0] + STEP, PROMPTS[2], PROMPTS[1] + STEP], [PROMPTS[1] + STEP + STEP, *PROMPTS]]
    reusing, fresh = HFGenerator(model_dir), HFGenerator(model_dir, prefix_cache_mb=0)
    assert [greedy(reusing, prompts) for prompts in calls] == [greedy(fresh, prompts) for prompts in calls]
    assert len(reusing.prefix_cache) > 0 and fresh.prefix_cache is None


def test_reused_states_give_the_samples_of_a_fresh_prefill(model_dir: Path) -> None:
    calls = [PROMPTS[:2], [PROMPTS[0] + STEP, PROMPTS[2], PROMPTS[1] + STEP]]

    def sampled(generator: HFGenerator) -> list:
        return [generator.generate(prompts, n=3, stop=[], temperature=0.8, max_tokens=12) for prompts in calls]

    assert sampled(HFGenerator(model_dir, seed=5)) == sampled(HFGenerator(model_dir, seed=5, prefix_cache_mb=0))


def test_prefix_cache_finds_the_longest_cached_prefix() -> None:
    cache = PrefixKVCache(max_bytes=1 << 20)
    cache.put([1, 2], [(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))])
    cache.put([1, 2, 3, 4], [(torch.ones(1, 4, 4), torch.ones(1, 4, 4))])
    assert cache.longest_prefix([1, 2, 3, 4, 5])[0] == 4
    assert cache.longest_prefix([1, 2, 3, 9])[0] == 2
    assert cache.longest_prefix([2, 1]) == (0, None)


def test_prefix_cache_evicts_the_least_recently_used_within_its_budget() -> None:
    def states(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(1, length, 16), torch.zeros(1, length, 16))]  # 128 bytes per position

    cache = PrefixKVCache(max_bytes=3 * 128 * 4)
    for first in (1, 2, 3):
        cache.put([first, 0, 0, 0], states(4))
    cache.longest_prefix([1, 0, 0, 0])  # used: now the most recent
    cache.put([4, 0, 0, 0], states(4))
    assert [cache.longest_prefix([first, 0, 0, 0])[0] for first in (1, 2, 3, 4)] == [4, 0, 4, 4]
    assert cache.nbytes <= cache.max_bytes


def test_prefix_cache_keeps_nothing_larger_than_its_budget() -> None:
    cache = PrefixKVCache(max_bytes=64)
    cache.put([1, 2, 3], [(torch.zeros(1, 3, 16), torch.zeros(1, 3, 16))])
    assert (len(cache), cache.nbytes) == (0, 0)


# --- sampling ----------------------------------------------------------------------------------------


def test_sampling_draws_tokens_at_their_probabilities() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probabilities.log().expand(40_000, 4)
    tokens = _sample_tokens(logits, 1.0, [random.Random(row) for row in range(len(logits))])
    frequencies = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(frequencies, probabilities, atol=0.01)


def test_prompt_seeds_count_the_uses_of_the_most_recent_prompts_only() -> None:
    seeds = PromptSeeds(0, remembered=2)
    first, again = seeds.next("a"), seeds.next("a")
    seeds.next("b"), seeds.next("c")  # "a" is forgotten
    assert first != again and seeds.next("a") == first



def test_restarted_prompt_seeds_give_each_prompt_its_first_seed_again() -> None:
    seeds = PromptSeeds(0)
    first = seeds.next("a")
    seeds.next("a")
    seeds.restart()
    assert seeds.next("a") == first

def test_inverting_the_cdf_skips_tokens_of_probability_zero() -> None:
    """Draws at the very start, on a boundary, and just below the total land on tokens with mass."""
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 3)
    draws = torch.tensor([[0.0], [0.5], [1.0 - 1e-12]], dtype=torch.float64)
    assert _invert_cdf(probabilities, draws).tolist() == [1, 3, 3]


def test_inverting_the_cdf_scales_draws_by_the_row_total() -> None:
    """Probabilities that sum to less than one (rounding) still reach the last token, never past it."""
    probabilities = torch.tensor([[0.25, 0.25, 0.2]])
    assert _invert_cdf(probabilities, torch.tensor([[0.9]], dtype=torch.float64)).tolist() == [2]


def test_sampling_keeps_tokens_of_tiny_probability_in_a_large_vocabulary() -> None:
    """In float32, a running sum over 150k tokens rounds away every token below ~3e-8."""
    probabilities = torch.full((1, 150_001), 1e-9)
    probabilities[0, 0] = 1 - 150_000 * 1e-9
    first = probabilities[0, 0].double()
    between_first_and_second = (first + 0.5e-9) / probabilities.double().sum()
    assert _invert_cdf(probabilities, between_first_and_second.reshape(1, 1)).tolist() == [1]


def test_sampling_rejects_non_finite_logits() -> None:
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="cannot sample"):
        _sample_tokens(logits, 1.0, [random.Random(0)])


def test_the_backend_frees_the_policy_when_its_block_ends(model_dir: Path) -> None:
    from models.backends import BackendConfig, open_generator

    with open_generator(model_dir, BackendConfig(backend="hf", device="cpu")) as generator:
        assert generator.model is not None
    assert generator.model is None and generator.prefix_cache is None
