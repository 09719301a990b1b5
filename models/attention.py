"""The attention Kaizen trains with: SDPA for right-padded batches, flash varlen for padding-free ones.

Registered with transformers as `kaizen_sdpa` (`register_training_attention`). Two kinds of batch
reach it, told apart by what the collator sent:

- Right-padded rows (TRL's SFT and preference collators without `padding_free`): causal SDPA with
  the padding mask dropped, so PyTorch runs its causal flash kernel instead of the masked one (on
  an H200 this took padded SFT of a 0.5B model from 35k to 59k tokens/s). It is exact for right
  padding: under causal attention a token sees only earlier positions, so padding at the end of a
  row never reaches a real token. Padded positions get values nobody reads (their labels are -100;
  the PPM head reads the last real token).
- Padding-free rows (`padding_free: true`, or BFD packing): TRL flattens the micro-batch into one
  row and sends each document's boundaries as `cu_seq_lens_q` / `max_length_q`. Each document
  attends causally to itself only. On CUDA this is PyTorch's flash varlen kernel
  (`torch.nn.attention.varlen`), one launch for the whole row with no padding computed; elsewhere
  (CPU tests) it is SDPA document by document, the same function more slowly.

Not covered: left padding (GRPO's prompts), attention dropout on the varlen kernel (it has none,
so dropout falls back to the per-document loop), sliding windows. RL keeps transformers' masked SDPA.
"""

from __future__ import annotations

import inspect
import math
from functools import cache
from itertools import pairwise
from typing import Any

TRAINING_ATTENTION = "kaizen_sdpa"


@cache
def _varlen_kernel() -> tuple[Any, frozenset[str]] | None:
    """PyTorch's flash varlen attention and the keyword arguments this version takes, or None where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_on_cuda(query: Any, key: Any, value: Any, cu_seq_lens: Any, max_length: int, scaling: float | None) -> Any:
    """[total, heads, dim] in and out through the flash kernel, or None where this torch cannot do it exactly."""
    import torch

    found = _varlen_kernel()
    if found is None or not query.is_cuda:
        return None
    if query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # SDPA is on autocast's list and gets half-precision inputs; this op is not, and rotary embeddings
        # computed from float32 weights hand it float32 queries and keys.
        half = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(half), key.to(half), value.to(half)
    if query.dtype not in (torch.bfloat16, torch.float16):
        return None
    kernel, parameters = found
    options: dict[str, Any] = {}
    if "window_size" in parameters:  # torch >= 2.12: (-1, 0) is causal
        options["window_size"] = (-1, 0)
    elif "is_causal" in parameters:  # torch 2.10-2.11
        options["is_causal"] = True
    else:
        return None
    if "scale" in parameters:
        options["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-12):
        return None  # torch 2.10 scales by 1/sqrt(dim) only
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:  # older kernels want as many key/value heads as query heads
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu_seq_lens = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    return kernel(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)


def _per_document(query: Any, key: Any, value: Any, cu_seq_lens: Any, scaling: float | None, dropout: float) -> Any:
    """The same attention as the varlen kernel, one SDPA call per document: [1, heads, total, dim] in and out."""
    import torch
    import torch.nn.functional as F

    bounds = cu_seq_lens.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout,
            is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
        )
        for start, end in pairwise(bounds) if end > start
    ]
    return torch.cat(outputs, dim=2)


def packed_attention(query: Any, key: Any, value: Any, cu_seq_lens: Any, max_length: int,
                     scaling: float | None = None, dropout: float = 0.0) -> Any:
    """Causal attention within each document of one padding-free row.

    query [1, heads, total, dim], key and value [1, kv_heads, total, dim]; returns [1, total, heads, dim]
    (the layout transformers' attention functions return). Tokens past `cu_seq_lens[-1]` are none.
    """
    if query.shape[0] != 1:
        raise ValueError(f"padding-free attention takes one flattened row, got a batch of {query.shape[0]}")
    if not dropout:
        flat = [tensor[0].transpose(0, 1) for tensor in (query, key, value)]  # [total, heads, dim]
        output = _varlen_on_cuda(*flat, cu_seq_lens, max_length, scaling)
        if output is not None:
            return output.unsqueeze(0)
    return _per_document(query, key, value, cu_seq_lens, scaling, dropout).transpose(1, 2).contiguous()


def training_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *,
                       dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature: padding-free rows by document, right-padded rows by causal SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None:
        max_length = int(kwargs.get("max_length_q") or int(cu_seq_lens.diff().max()))
        return packed_attention(query, key, value, cu_seq_lens, max_length, scaling, dropout), None
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def register_training_attention() -> str:
    """Register (idempotent) `kaizen_sdpa` with transformers and return its name for `attn_implementation`.

    No mask function is registered with it: transformers then builds no mask at all, which is what
    both kinds of batch want (and it skips scanning position ids for packed documents every forward).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(TRAINING_ATTENTION, training_attention)
    return TRAINING_ATTENTION
