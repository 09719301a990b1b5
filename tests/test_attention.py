"""Kaizen's training attention: right-padded rows without their mask, padding-free rows document by document."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.attention import packed_attention, register_training_attention


def _block_diagonal_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              lengths: list[int]) -> torch.Tensor:
    """Masked SDPA over the whole row, each token seeing earlier tokens of its own document: [1, total, heads, dim]."""
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = document.numel()
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = causal & (document[:, None] == document[None, :])
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    return output.transpose(1, 2)


def _cu_seq_lens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _packed_inputs(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 16,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    shapes = [(1, heads, total, dim), (1, kv_heads, total, dim), (1, kv_heads, total, dim)]
    return tuple(torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for shape in shapes)


def test_packed_attention_keeps_documents_apart() -> None:
    lengths = [5, 1, 9, 3]
    query, key, value = _packed_inputs(lengths)
    actual = packed_attention(query, key, value, _cu_seq_lens(lengths), max_length=9)
    torch.testing.assert_close(actual, _block_diagonal_reference(query, key, value, lengths))


def test_packed_attention_refuses_more_than_one_row() -> None:
    query, key, value = (torch.cat([tensor, tensor]) for tensor in _packed_inputs([3, 4]))
    with pytest.raises(ValueError, match="one flattened row"):
        packed_attention(query, key, value, _cu_seq_lens([3, 4]), max_length=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA GPU")
def test_flash_varlen_kernel_matches_the_reference_on_gpu() -> None:
    lengths = [700, 1, 1300, 37, 2000]
    query, key, value = _packed_inputs(lengths, heads=12, kv_heads=2, dim=128, device="cuda", dtype=torch.bfloat16)
    actual = packed_attention(query, key, value, _cu_seq_lens(lengths).cuda(), max_length=2000)
    expected = _block_diagonal_reference(*(tensor.double().cpu() for tensor in (query, key, value)), lengths)
    error = (actual.double().cpu() - expected).norm() / expected.norm()
    assert error < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA GPU")
def test_float32_queries_under_autocast_still_take_the_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.attention

    def slow_path(*args: object, **kwargs: object) -> None:
        raise AssertionError("fell back to per-document SDPA")

    monkeypatch.setattr(models.attention, "_per_document", slow_path)
    lengths = [300, 500]
    query, key, value = _packed_inputs(lengths, heads=12, kv_heads=2, dim=128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = packed_attention(query, key, value, _cu_seq_lens(lengths).cuda(), max_length=500)
    assert output.dtype == torch.bfloat16


def _load(model_dir: Path, attention: str, head: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).eval()
    return AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation=attention,
                                                              num_labels=1).eval()


@pytest.mark.parametrize("head", ["causal_lm", "classifier"])
def test_right_padded_rows_equal_masked_sdpa_on_real_tokens(tiny_model: Path, head: str) -> None:
    masked = _load(tiny_model, "sdpa", head)
    unmasked = _load(tiny_model, register_training_attention(), head)
    unmasked.load_state_dict(masked.state_dict())
    input_ids = torch.randint(10, 500, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 7:], attention_mask[1, 7:] = masked.config.pad_token_id, 0
    with torch.no_grad():
        expected = masked(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = unmasked(input_ids=input_ids, attention_mask=attention_mask).logits
    if head == "causal_lm":
        expected, actual = torch.cat([expected[0], expected[1, :7]]), torch.cat([actual[0], actual[1, :7]])
    torch.testing.assert_close(actual, expected)


def test_a_padding_free_row_gives_each_document_its_own_logits(tiny_model: Path) -> None:
    """What TRL's padding-free collator sends (one row, restarting position ids, cu_seq_lens) reaches the attention."""
    model = _load(tiny_model, register_training_attention(), "causal_lm")
    documents = [torch.randint(10, 500, (length,)) for length in (6, 11, 4)]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=document[None]).logits[0] for document in documents])
        packed = model(
            input_ids=torch.cat(documents)[None],
            position_ids=torch.cat([torch.arange(len(document)) for document in documents])[None],
            cu_seq_lens_q=_cu_seq_lens([6, 11, 4]), cu_seq_lens_k=_cu_seq_lens([6, 11, 4]),
            max_length_q=11, max_length_k=11,
        ).logits[0]
    torch.testing.assert_close(packed, alone)
