"""Bounded-memory SPLADE pooling for training (``llmret.retrieval.pooled_logits``) and device-side
pruning of encoded vectors (``pruned_csr``), against the full-logits reference path.

The reference is today's formula over all (B, L, V) logits: ``splade_pool(head(h).float(), mask)``.
Tolerances: float32 values and gradients agree to 1e-6 absolute on the pure tensors (the chunked
matmul may round the last bit differently), 1e-5 through a 2-layer Llama (relative to values of
order 1); bfloat16 values and weight gradients exactly on the pure tensors, the hidden states'
gradient to one bfloat16 step (2**-7 of its largest entry), and gradients through the model to 2% of
their largest entry (the backward adds per-chunk bfloat16 products in float32, the reference
rounds one product). Ties (equal maxima) split the gradient exactly as ``amax`` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config

from llmret.csplade.losses import flops
from llmret.retrieval.pooled_logits import pooled_splade, slicable_head, vocab_chunk
from llmret.retrieval.sparse_encoder import (
    build_batch,
    prune,
    pruned_csr,
    sparse_logits,
    sparse_vectors,
    splade_pool,
    to_csr,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- pure tensors


def _both(h, w, b, mask, probe, block):
    """(values, grad h, grad w, grad b) of the reference and of pooled_splade, loss ``sum(v * probe)``."""
    out = []
    for new in (False, True):
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
        v = pooled_splade(hh, ww, bb, mask, block) if new else splade_pool(F.linear(hh, ww, bb).float(), mask)
        (v * probe).sum().backward()
        out.append((v, hh.grad, ww.grad, bb.grad))
    return out


def _inputs(dtype, seed=0, batch=3, length=9, hidden=16, vocab=101):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g).to(dtype)
    w = (0.5 * torch.randn(vocab, hidden, generator=g)).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    mask[2, :3] = 0  # echo: only the second copy pooled
    h[1, 6] = 50.0  # a padded position with huge logits must not count
    return h, w, b, mask, torch.randn(batch, vocab, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 101, 500])
def test_pooled_splade_equals_the_full_logits_path(dtype, chunk):
    h, w, b, mask, probe = _inputs(dtype)
    ref, new = _both(h, w, b, mask, probe, block=chunk * h.shape[0] * h.shape[1])
    for name, x, y in zip(("values", "grad h", "grad w", "grad b"), ref, new, strict=True):
        assert x.dtype == y.dtype, name
        atol = 1e-6 if dtype == torch.float32 else 0.0
        if name == "grad h" and dtype == torch.bfloat16:  # a sum over chunks: one bfloat16 step
            atol = 2**-7 * float(x.float().abs().max())
        torch.testing.assert_close(y.float(), x.float(), atol=atol, rtol=0, msg=name)
    assert ref[0].dtype == torch.float32 and (ref[0] == 0).any() and (ref[0] > 0).any()


def test_ties_split_the_gradient_as_amax_does():
    """Exactly representable inputs: equal positions give bit-equal logits, so maxima tie."""
    h = torch.tensor([[[1.0, 0.5], [1.0, 0.5], [2.0, -1.0], [1.0, 0.5]]])
    w = torch.tensor([[1.0, 2.0], [0.5, 1.0], [-1.0, 0.0], [0.25, 4.0]])
    b = torch.zeros(4)
    mask = torch.tensor([[1, 1, 1, 0]])  # the masked copy of the tied row must not share the gradient
    ref, new = _both(h, w, b, mask, torch.tensor([[1.0, 2.0, 3.0, 4.0]]), block=2)
    for x, y in zip(ref, new, strict=True):
        torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert ref[1][0, 0].abs().sum() > 0 and torch.equal(ref[1][0, 0], ref[1][0, 1])  # split evenly
    assert torch.equal(ref[1][0, 3], torch.zeros(2))


def test_pooled_splade_keeps_no_full_logits_for_the_backward():
    """What the forward saves for the backward: nothing of size batch x length x vocabulary."""
    h, w, b, mask, _ = _inputs(torch.float32, vocab=1000)
    h.requires_grad_()
    w.requires_grad_()
    full = h.shape[0] * h.shape[1] * w.shape[0]
    for new in (False, True):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if new:
                pooled_splade(h, w, b, mask, block=h.shape[0] * h.shape[1] * 64)
            else:
                splade_pool(F.linear(h, w, b).float(), mask)
        biggest = max(sizes)
        assert (biggest < full) if new else (biggest >= full)


def test_pooled_splade_refuses_bad_masks_and_sizes_chunks():
    h, w, b, mask, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="no pooled position"):
        pooled_splade(h, w, b, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="does not match"):
        pooled_splade(h, w, b, mask[:, :2])
    assert vocab_chunk(1000, 128_256, 1 << 24) == 16_777
    assert vocab_chunk(10, 50, 1 << 24) == 50 and vocab_chunk(10**9, 50) == 1
    assert slicable_head(torch.nn.Linear(4, 8)) and not slicable_head(torch.nn.Sequential(torch.nn.Linear(4, 8)))
    hooked = torch.nn.Linear(4, 8)
    hooked.register_forward_hook(lambda *a: None)
    assert not slicable_head(hooked)


# --------------------------------------------------------------------------- through a Llama


def _llama(dtype, vocab=1000, lora=False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(vocab, attn_implementation="sdpa")).to(dtype)
    if not lora:
        return lm
    from llmret.training.lora import LoraSpec, apply_lora

    lm = apply_lora(lm, LoraSpec(dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")))
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A a gradient too
            torch.nn.init.normal_(p, std=0.1)
    return lm


def _grads(lm, batch, bidirectional, probe, new):
    lm.zero_grad(set_to_none=True)
    if new:  # 97 vocabulary entries a chunk: 11 chunks, the last one shorter
        v = sparse_vectors(lm, batch, bidirectional, block=97 * batch.input_ids.numel())
    else:
        v = splade_pool(sparse_logits(lm, batch, bidirectional), batch.pool_mask)
    ((v * probe).sum() + 0.1 * flops(v)).backward()
    return v.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


ROWS = [[5, 9, 17, 300, 2], [7, 8], [11, 999, 12, 13, 14, 15, 16]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_llama_vectors_and_gradients_equal_the_full_logits_path(dtype, lora):
    lm = _llama(dtype, lora=lora)
    probe = torch.randn(len(ROWS), 1000, generator=torch.Generator().manual_seed(1))
    for echo, bidirectional in ((False, False), (True, False), (False, True), (True, True)):
        batch = build_batch(ROWS, 0, echo=echo, head=1)
        ref_v, ref_g = _grads(lm, batch, bidirectional, probe, new=False)
        new_v, new_g = _grads(lm, batch, bidirectional, probe, new=True)
        where = f"{dtype} lora={lora} echo={echo} bidirectional={bidirectional}"
        torch.testing.assert_close(new_v, ref_v, atol=1e-5 if dtype == torch.float32 else 0.0, rtol=0, msg=where)
        assert ref_g.keys() == new_g.keys() and ref_g, where
        assert any("lora_" in n for n in ref_g) == lora and any("embed_tokens" in n for n in ref_g) != lora
        for name, g in ref_g.items():
            scale = float(g.float().abs().max()) or 1.0
            tol = 1e-5 * max(1.0, scale) if dtype == torch.float32 else 2e-2 * scale
            torch.testing.assert_close(new_g[name].float(), g.float(), atol=tol, rtol=0, msg=f"{where} {name}")


def test_a_lora_wrapped_head_falls_back_to_the_full_logits():
    from llmret.training.lora import LoraSpec, apply_lora

    lm = apply_lora(_llama(torch.float32), LoraSpec(dropout=0.0, target_modules=("lm_head",)))
    batch = build_batch(ROWS[:2], 0)
    with torch.no_grad():
        ref = splade_pool(sparse_logits(lm, batch, False), batch.pool_mask)
        torch.testing.assert_close(sparse_vectors(lm, batch, False), ref, atol=0, rtol=0)


# --------------------------------------------------------------------------- device-side pruning


@pytest.mark.parametrize("top_k", [0, 1, 3, 8, 20])
@pytest.mark.parametrize("min_weight", [0.0, 0.5])
def test_pruned_csr_equals_pruning_the_dense_block(top_k, min_weight):
    g = torch.Generator().manual_seed(0)
    w = torch.relu(torch.randn(6, 12, generator=g))
    w[1] = 0.0  # an empty row
    w[2, :5] = 0.7  # ties
    w[3, 2] = w[3, 7] = w[3].max()
    got, ref = pruned_csr(w, top_k, min_weight), to_csr(prune(w, top_k, min_weight))
    assert got.shape == ref.shape and got.dtype == np.float32 and got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), ref.toarray())
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    assert (got.data != 0).all()
