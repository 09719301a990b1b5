"""Training throughput (tokens/s) and model FLOPs utilisation of the SFT and PPM entry points.

Runs the product path itself (`models.training.train_sft` / `train_ppm`: subprocess, TRL trainer,
checkpoint, provenance) on synthetic step-format data and reads the steady-state tokens/s that the
run records in its provenance (non-padding tokens, from the end of optimizer step 2 to the end).

- GPU: randomly initialised Qwen2.5-0.5B- and 1.5B-shaped models built from a `Qwen2Config` (no
  download), bf16 autocast over fp32 master weights, 4 micro-batches per optimizer step as in the
  GPU recipes. Batches are either length-grouped and right-padded (the recipes' default) or packed
  padding-free (`packing: true`, flash varlen attention per document, `models.attention`), with
  and without Liger's layer kernels (needs `liger-kernel`, the `gpu` extra); "wrapped" packing,
  where documents see each other, for comparison. `bench_training_step.py` times the same step
  without the Trainer.
- CPU: the tiny model (`models.tiny`); tokens/s only.

MFU = 6 * N * tokens/s / peak, where N counts the weights each token is multiplied by: all
non-embedding weights (the embedding lookup is not a matmul), plus for SFT the LM head weighted by
the share of tokens that reach it (TRL's fused LM head on GPU projects only the completion tokens,
~95% here), plus the one-output head for the PPM. Attention-score FLOPs are not counted, as usual
for MFU. Peak: H100 SXM bf16 dense, 989 TFLOP/s (`--peak-tflops` for other GPUs).

Usage (from the repository root):
    PYTHONPATH=. python benchmarks/bench_training.py --json bench_training.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

H100_SXM_BF16_DENSE_TFLOPS = 989.0

# Shapes of the released Qwen2.5 checkpoints (config.json of Qwen2.5-0.5B and Qwen2.5-Math-1.5B).
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
}
QWEN_VOCAB = 151936


@dataclass(frozen=True)
class BenchRun:
    """One measured training run: a model, a stage and the settings that differ from the common ones."""

    name: str
    model: str
    kind: str
    per_device_batch: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    name: str
    model: str
    kind: str
    device: str
    per_device_batch: int
    matmul_params: int
    tokens_per_second: float
    mfu: float | None
    peak_memory_gib: float | None
    wall_s: float
    settings: dict[str, Any]
    last_log: dict[str, Any]


# Padding-free packing (TRL's best-fit-decreasing `bfd`): documents are packed into 4096-token rows,
# each micro-batch is flattened into one row with no padding, and every document attends to itself
# only (flash varlen, `models.attention`). The micro-batch counts packed rows, not documents.
_PACKED = {"packing": True, "packing_strategy": "bfd", "train_sampling_strategy": "random"}
# Liger's fused RMSNorm, SwiGLU and RoPE kernels (TRL keeps its own fused LM head and loss).
_LIGER = {"use_liger_kernel": True}
# Packing by concatenation ("wrapped") gives fixed 4096-token rows with no padding; documents in a
# row then see each other, which the product avoids. Measured for comparison.
_WRAPPED = {"packing": True, "packing_strategy": "wrapped", "train_sampling_strategy": "random"}
GPU_RUNS = [
    BenchRun("sft-1.5b-packed-liger", "qwen2.5-1.5b", "sft", 2, {**_PACKED, **_LIGER}),
    BenchRun("sft-1.5b-packed", "qwen2.5-1.5b", "sft", 2, _PACKED),
    BenchRun("sft-1.5b-packed-liger-b3", "qwen2.5-1.5b", "sft", 3, {**_PACKED, **_LIGER}),
    BenchRun("sft-1.5b-packed-liger-b4", "qwen2.5-1.5b", "sft", 4, {**_PACKED, **_LIGER}),
    BenchRun("sft-1.5b", "qwen2.5-1.5b", "sft", 6),
    BenchRun("ppm-1.5b-liger", "qwen2.5-1.5b", "ppm", 4, _LIGER),
    BenchRun("ppm-1.5b", "qwen2.5-1.5b", "ppm", 4),
    # The 1.5B recipe's setting: recomputing activations costs ~1/3 more compute, which MFU does not count.
    BenchRun("sft-1.5b-packed-liger-ckpt", "qwen2.5-1.5b", "sft", 6,
             {**_PACKED, **_LIGER, "gradient_checkpointing": True}),
    BenchRun("sft-1.5b-packed-liger-compile", "qwen2.5-1.5b", "sft", 2, {**_PACKED, **_LIGER, "torch_compile": True}),
    BenchRun("sft-0.5b-packed-liger", "qwen2.5-0.5b", "sft", 4, {**_PACKED, **_LIGER}),
    BenchRun("ppm-0.5b-liger", "qwen2.5-0.5b", "ppm", 8, _LIGER),
    BenchRun("sft-1.5b-wrapped", "qwen2.5-1.5b", "sft", 2, _WRAPPED),
]
CPU_RUNS = [BenchRun("sft-tiny", "tiny", "sft", 8), BenchRun("sft-tiny-packed", "tiny", "sft", 4, _PACKED),
            BenchRun("ppm-tiny", "tiny", "ppm", 8)]


# --- synthetic data ----------------------------------------------------------------------------

_WORDS = ["total", "count", "value", "area", "ratio", "sum", "price", "width", "height", "speed", "apples", "boxes"]


def _step_block(rng: random.Random, number: int) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 9)
    first, second = rng.sample(_WORDS, 2)
    return f"# Step {number}: compute the {first} from the {second}\n{first} = {a} * {b} + {c}\n<end_of_step>\n"


def _text_of_tokens(tokenizer: Any, rng: random.Random, tokens: int, start: int = 1) -> str:
    """Step blocks until about `tokens` tokens (counted block by block)."""
    parts, count = [], 0
    while count < tokens:
        block = _step_block(rng, start + len(parts))
        parts.append(block)
        count += len(tokenizer(block)["input_ids"])
    return "".join(parts)


def write_tables(tokenizer: Any, out_dir: Path, rows: int, seed: int = 0) -> tuple[Path, Path, float]:
    """An `sft` table (prompt + completion 600-2000 tokens), a `pairs` table (prefix + step 400-1600 tokens),
    and the share of the SFT tokens that are completion tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from search.steps import render_prompt

    rng = random.Random(seed)
    sft, pairs = [], []
    for index in range(rows):
        prompt = render_prompt(f"Problem {index}: " + _text_of_tokens(tokenizer, rng, 60))
        sft.append({"prompt": prompt, "completion": _text_of_tokens(tokenizer, rng, rng.randint(540, 1940))})
        prefix = prompt + _text_of_tokens(tokenizer, rng, rng.randint(300, 1500))
        pairs.append({"prompt": prefix, "chosen": _step_block(rng, 99), "rejected": _step_block(rng, 99)})
    sft_path, pairs_path = out_dir / "sft.parquet", out_dir / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(sft), sft_path)
    pq.write_table(pa.Table.from_pylist(pairs), pairs_path)
    prompt_tokens = sum(len(tokenizer(row["prompt"])["input_ids"]) for row in sft)
    completion_tokens = sum(len(tokenizer(row["completion"])["input_ids"]) for row in sft)
    return sft_path, pairs_path, completion_tokens / (prompt_tokens + completion_tokens)


# --- models ------------------------------------------------------------------------------------


def qwen_shaped_config(shape: str, **fields: Any) -> Any:
    """A `Qwen2Config` of a released shape with Qwen's full 151,936-row vocabulary, so that the LM
    head costs what it costs in the real model whatever tokenizer is used."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=QWEN_VOCAB, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, **QWEN_SHAPES[shape], **fields)


def build_qwen_shaped(out_dir: Path, shape: str, tokenizer: Any) -> Path:
    """A randomly initialised Qwen2 model of a released shape, saved with the (small) benchmark tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = qwen_shaped_config(shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def matmul_params(config: Any, kind: str, head_token_share: float = 1.0) -> int:
    """Weights the average token is multiplied by: non-embedding weights, plus the LM head (SFT) times the share
    of tokens projected through it, or the score head (PPM)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(parameter.numel() for parameter in model.parameters())  # tied head counted once
    non_embedding = total - embedding
    head = config.vocab_size * config.hidden_size * head_token_share if kind == "sft" else config.hidden_size
    return int(non_embedding + head)


# --- runs --------------------------------------------------------------------------------------


def common_settings(on_gpu: bool, steps: int) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "max_steps": steps, "logging_steps": 4, "learning_rate": 7.0e-6, "max_length": 4096,
        "train_sampling_strategy": "group_by_length", "warmup_steps": 0,
    }
    if on_gpu:
        # Accumulation as in the GPU recipes (global batch 128 over 8 GPUs): the optimizer step and
        # its synchronisations are amortised over several micro-batches.
        settings.update(bf16=True, gradient_checkpointing=False, auto_find_batch_size=True, gradient_accumulation_steps=4)
    else:
        settings.update(bf16=False, gradient_checkpointing=False, max_length=1024)
    return settings


def measure(run: BenchRun, model_dir: Path, table: Path, work_dir: Path, settings: dict[str, Any],
            device: str, peak_tflops: float | None, timeout_s: float, head_token_share: float) -> BenchResult:
    from models.training import train_ppm, train_sft

    train = train_sft if run.kind == "sft" else train_ppm
    overrides = {**settings, "per_device_train_batch_size": run.per_device_batch, **run.settings}
    started = time.perf_counter()
    checkpoint = train([table], work_dir / run.name, base_model=str(model_dir), overrides=overrides, timeout_s=timeout_s)
    wall_s = time.perf_counter() - started
    provenance = json.loads((checkpoint / "provenance.json").read_text())
    metrics = provenance["metrics"]
    # The last logged training step: loss, and for the PPM whether values still spread (not all +-1).
    last_log = next((entry for entry in reversed(provenance["log_history"]) if "loss" in entry), {})
    shutil.rmtree(checkpoint, ignore_errors=True)
    from transformers import AutoConfig

    params = matmul_params(AutoConfig.from_pretrained(model_dir), run.kind, head_token_share)
    tokens_per_second = metrics["tokens_per_second"]
    mfu = 6 * params * tokens_per_second / (peak_tflops * 1e12) if peak_tflops else None
    return BenchResult(run.name, run.model, run.kind, device, run.per_device_batch, params, tokens_per_second, mfu,
                       metrics.get("peak_memory_gib"), wall_s, overrides, last_log)


def _print_table(results: list[BenchResult]) -> None:
    header = (f"{'run':<16} {'device':<24} {'batch':>5} {'N (M)':>8} {'tokens/s':>10} {'MFU':>6} {'mem GiB':>8} "
              f"{'wall s':>7}")
    print(header)
    print("-" * len(header))
    for result in results:
        mfu = f"{100 * result.mfu:5.1f}%" if result.mfu is not None else "   n/a"
        memory = f"{result.peak_memory_gib:8.1f}" if result.peak_memory_gib is not None else "     n/a"
        print(f"{result.name:<16} {result.device[:24]:<24} {result.per_device_batch:>5} {result.matmul_params / 1e6:>8.1f} "
              f"{result.tokens_per_second:>10.0f} {mfu:>6} {memory} {result.wall_s:>7.1f}")


def main(argv: list[str] | None = None) -> int:
    import torch

    from models.tiny import build_tiny_model, default_corpus, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, the first 2 being warm-up "
                        "(default: 12 on GPU, of 4 micro-batches each; 10 on CPU)")
    parser.add_argument("--runs", default=None, help="comma-separated run names (default: all for the device)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="GPU peak bf16 dense TFLOP/s for MFU (default: H100 SXM, 989)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no new run after this many seconds; a run is killed 90 s after it")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (after every run)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    args.steps = args.steps or (12 if on_gpu else 10)
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    runs = GPU_RUNS if on_gpu else CPU_RUNS
    if args.runs:
        runs = [run for run in runs if run.name in args.runs.split(",")]
    work_dir = args.workdir or Path(tempfile.mkdtemp(prefix="kaizen-bench-training-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    corpus = default_corpus(seed=0, synthetic_examples=500, include_shared=False)
    tokenizer = train_tokenizer(corpus, vocab_size=2048, model_max_length=4096)
    settings = common_settings(on_gpu, args.steps)
    micro_batches = args.steps * settings.get("gradient_accumulation_steps", 1)
    rows = int(micro_batches * max(run.per_device_batch for run in runs) * 1.25) + 8
    sft_table, pairs_table, completion_share = write_tables(tokenizer, work_dir, rows=rows)
    # TRL's fused LM head projects only completion tokens where Triton runs (CUDA); every token on CPU.
    head_token_share = completion_share if on_gpu else 1.0
    model_dirs: dict[str, Path] = {}
    results: list[BenchResult] = []
    report: dict[str, Any] = {"device": device, "peak_tflops": args.peak_tflops if on_gpu else None,
                              "torch": torch.__version__, "steps": args.steps,
                              "head_token_share": head_token_share, "results": []}
    for run in runs:
        remaining_s = args.budget_s - (time.perf_counter() - started)
        if remaining_s <= 0:
            print(f"skipping {run.name}: over the {args.budget_s:g} s budget", file=sys.stderr)
            continue
        if run.model not in model_dirs:
            target = work_dir / f"model-{run.model}"
            model_dirs[run.model] = (
                build_tiny_model(target) if run.model == "tiny"
                else build_qwen_shaped(target, run.model, tokenizer)
            )
        table = sft_table if run.kind == "sft" else pairs_table
        try:
            result = measure(run, model_dirs[run.model], table, work_dir, settings, device,
                             args.peak_tflops if on_gpu else None, timeout_s=remaining_s + 90,
                             head_token_share=head_token_share)
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others' figures
            print(f"{run.name} failed: {err}", file=sys.stderr)
            report["results"].append({"name": run.name, "error": str(err)})
            continue
        results.append(result)
        report["results"].append(asdict(result))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(results)
    if args.workdir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
