"""One SFT or PPM optimizer step in-process, without the Trainer: the ceiling for `bench_training.py`.

The same model and kernels as the product path (a randomly initialised Qwen2.5-shaped model,
Kaizen's training attention, TRL's fused LM head for SFT, optionally Liger's layer kernels, fused
AdamW, gradient clipping, 4 micro-batches a step) on synthetic batches already on the GPU, timed
over 3 steps after 2 warm-up steps. The gap to `bench_training.py` is what the Trainer, TRL's
per-micro-batch metrics and data loading cost; `--weights bf16` (no float32 master weights, which
the product keeps because 7e-6 updates vanish in bf16) shows what autocast's casts cost.

SFT batches are padding-free packed rows of 4096 tokens (documents of 600-2000 tokens); PPM
batches are right-padded chosen/rejected rows of 460-1660 tokens, as TRL's collators make them.
MFU counts every token through the LM head (SFT), so it reads ~1% above `bench_training.py`'s.

Usage (GPU): python benchmarks/bench_training_step.py --kind sft --rows 3 --liger [--profile]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import (
    H100_SXM_BF16_DENSE_TFLOPS,
    QWEN_SHAPES,
    QWEN_VOCAB,
    matmul_params,
    qwen_shaped_config,
)

from models.attention import register_training_attention

ROW_TOKENS = 4096


def build_model(kind: str, shape: str, liger: bool, weights: str) -> Any:
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    config = qwen_shaped_config(shape, num_labels=1, pad_token_id=0)
    config._attn_implementation = register_training_attention()
    with torch.device("cuda"):
        model = (Qwen2ForCausalLM if kind == "sft" else Qwen2ForSequenceClassification)(config)
    if weights == "bf16":
        model.to(torch.bfloat16)
    if kind == "sft":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model.train()


def sft_batch(rows: int, rng: random.Random) -> tuple[dict[str, Any], int]:
    import torch

    total = rows * ROW_TOKENS
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(600, 2000), total - sum(lengths)))
    input_ids = torch.randint(1, QWEN_VOCAB - 1000, (1, total), device="cuda")
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None].cuda()
    labels = input_ids.masked_fill(position_ids == 0, -100)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "fused_lm_head": True,
             "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths),
             "max_length_k": max(lengths)}
    return batch, total


def ppm_batch(pairs: int, rng: random.Random) -> tuple[dict[str, Any], int]:
    import torch

    chosen = [rng.randint(460, 1660) for _ in range(pairs)]
    lengths = chosen + [length + rng.randint(-10, 10) for length in chosen]
    attention_mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device="cuda")
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = torch.randint(1, QWEN_VOCAB - 1000, attention_mask.shape, device="cuda") * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask}, sum(lengths)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["sft", "ppm"], default="sft")
    parser.add_argument("--shape", choices=sorted(QWEN_SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--rows", type=int, default=3, help="SFT: packed 4096-token rows per micro-batch; PPM: pairs")
    parser.add_argument("--liger", action="store_true", help="Liger's RMSNorm, SwiGLU and RoPE kernels")
    parser.add_argument("--weights", choices=["fp32-autocast", "bf16"], default="fp32-autocast")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one more step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    model = build_model(args.kind, args.shape, args.liger, args.weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=7e-6, fused=True)
    batch, tokens = (sft_batch if args.kind == "sft" else ppm_batch)(args.rows, random.Random(0))
    accumulation = 4

    def step() -> None:
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.weights != "bf16"):
                outputs = model(**batch)
                if args.kind == "sft":
                    loss = outputs.loss
                else:
                    values = outputs.logits.squeeze(-1).tanh()
                    loss = -torch.nn.functional.logsigmoid(values[:args.rows] - values[args.rows:]).mean()
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - started) / 3
    tokens_per_second = accumulation * tokens / step_s
    mfu = 6 * matmul_params(model.config, args.kind) * tokens_per_second / (args.peak_tflops * 1e12)
    print(f"{args.kind} {args.shape} rows={args.rows} liger={args.liger} weights={args.weights}: "
          f"{step_s * 1000:.0f} ms/step, {tokens_per_second:.0f} tokens/s, MFU {100 * mfu:.1f}%, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            step()
            torch.cuda.synchronize()
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
