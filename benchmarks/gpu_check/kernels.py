"""Parts ``csplade`` (forward + backward of the library's SPLADE pooling and training loss at
Llama-3 width), ``encode`` (the library's dense encoder: texts/s and the share of wall time
outside the forward pass) and ``search`` (brute-force GPU search vs FAISS on the CPU)."""

from __future__ import annotations

import shutil
import time

from .common import SEED, Context, median, peak_figure, row, synchronize, synthetic_texts

# --------------------------------------------------------------------------- csplade


def _sparse_model(ctx: Context):
    """A random 2-layer causal Llama at Llama-3-8B's width and vocabulary, LoRA applied as the
    CSPLADE stage applies it, gradient checkpointing on (as the preset trains)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmret.csplade.sparse_training import CspladeSpec, SparseModel
    from llmret.training.lora import LoraSpec, apply_lora

    s = ctx.sizes
    cfg = LlamaConfig(
        vocab_size=s.sp_vocab,
        hidden_size=s.sp_hidden,
        intermediate_size=s.sp_intermediate,
        num_hidden_layers=2,
        num_attention_heads=s.sp_heads,
        num_key_value_heads=s.sp_kv_heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    with torch.device(ctx.device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, ctx.dtype_name), attn_implementation="sdpa")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraSpec(r=4 if ctx.tiny else 16, alpha=8 if ctx.tiny else 32, dropout=0.05)
    spec = CspladeSpec.from_config(
        {"group_size": s.sp_group, "max_query_length": s.sp_query, "max_passage_length": s.sp_passage}
    )
    model = SparseModel(apply_lora(lm, lora, seed=SEED), spec, lora).train()
    model.set_step(spec.flops_warmup_steps)  # past the warm-up: the FLOPS terms at full weight
    return model, lm


def _head_chunked(lm) -> str:
    try:
        from llmret.retrieval.pooled_logits import slicable_head
    except ImportError:
        return "unknown"
    return "yes" if slicable_head(lm.get_output_embeddings()) else "no (full logits)"


def csplade(ctx: Context) -> list[dict]:
    import torch

    from llmret.retrieval.sparse_encoder import build_batch

    s = ctx.sizes
    model, lm = _sparse_model(ctx)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    gen = torch.Generator().manual_seed(SEED)

    def ids(n: int, length: int) -> list[list[int]]:
        return torch.randint(4, s.sp_vocab, (n, length), generator=gen).tolist()

    query = build_batch(ids(s.sp_queries, s.sp_query), pad_id=3).to(ctx.device)
    passage = build_batch(ids(s.sp_queries * s.sp_group, s.sp_passage), pad_id=3).to(ctx.device)
    times, reps = [], 2 if ctx.tiny else 3
    for i in range(1 + reps):  # the first one warms up kernels and the allocator
        if i == 1 and ctx.gpu:
            torch.cuda.reset_peak_memory_stats()
        synchronize(ctx.device)
        t0 = time.perf_counter()
        out = model(query, passage)
        out["loss"].backward()
        synchronize(ctx.device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak, what = peak_figure(ctx.device)
    loss = float(out["loss"])
    t = median(times[1:])
    text = (
        f"{s.sp_queries} queries x {s.sp_group} passages of {s.sp_passage} tokens, hidden {s.sp_hidden}, "
        f"vocab {s.sp_vocab:,}: forward+backward {t:.2f} s, peak {peak:.1f} {what} (weights {weights_gb:.1f} GB), "
        f"loss {loss:.3f}, LM head in vocabulary chunks: {_head_chunked(lm)}"
    )
    ok = torch.isfinite(torch.tensor(loss)).item()
    return [row("CSPLADE fwd+bwd 2 layers", ok, text, seconds=t, peak_gb=peak, weights_gb=weights_gb, loss=loss)]


# --------------------------------------------------------------------------- encode


def encode(ctx: Context) -> list[dict]:
    """The library's TextEncoder on the 2-layer model: texts/s, and the wall time outside the
    forward pass (tokenising, batching, padding, pooling, copies), the forward timed by hooks
    that synchronise the device around it."""
    from llmret.retrieval.encoder import EncoderSpec, TextEncoder

    s, inp = ctx.sizes, ctx.inputs()
    max_len = s.encode_words[1] + 6
    spec = EncoderSpec.from_config(
        {"dtype": ctx.dtype_name, "batch_tokens": s.encode_batch_tokens, "max_passage_length": max_len}
    )
    enc = TextEncoder(inp["model_2L"], spec, device=ctx.device)
    texts = synthetic_texts(s.encode_texts, s.encode_words, seed=5, vocab_size=s.vocab)
    enc.encode(texts[:64], "passage", show_progress=False)  # warm-up
    t0 = time.perf_counter()
    tokens = sum(len(x) for x in enc.tokenize(texts, "passage"))
    tokenize_s = time.perf_counter() - t0
    clock = {"forward": 0.0, "start": 0.0, "calls": 0}

    def before(_module, _args):
        synchronize(ctx.device)
        clock["start"] = time.perf_counter()

    def after(_module, _args, _out):
        synchronize(ctx.device)
        clock["forward"] += time.perf_counter() - clock["start"]
        clock["calls"] += 1

    hooks = [enc.model.register_forward_pre_hook(before), enc.model.register_forward_hook(after)]
    synchronize(ctx.device)
    t0 = time.perf_counter()
    vectors = enc.encode(texts, "passage", show_progress=False)
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    outside = 1 - clock["forward"] / wall
    text = (
        f"{len(texts):,} texts ({tokens / len(texts):.0f} tokens avg), {ctx.dtype_name}, batch_tokens "
        f"{s.encode_batch_tokens}: {len(texts) / wall:,.0f} texts/s ({tokens / wall:,.0f} tokens/s), "
        f"{clock['calls']} forward passes; {outside:.0%} of wall time outside the forward "
        f"(tokenising alone {tokenize_s / wall:.0%})"
    )
    ok = vectors.shape == (len(texts), s.hidden) and bool((vectors == vectors).all())
    data = {"texts_per_s": len(texts) / wall, "wall_s": wall, "forward_s": clock["forward"], "tokenize_s": tokenize_s}
    return [row("encode 2 layers", ok, text, outside_share=outside, **data)]


# --------------------------------------------------------------------------- search


def _unit_vectors(ctx: Context, n: int, dim: int, gen):
    """``n`` random unit vectors, float16 (as corpus shards store 16-bit encoders' vectors)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty(n, dim, dtype=torch.float16, device=ctx.device)
    for a in range(0, n, 65536):
        x = torch.randn(min(65536, n - a), dim, generator=gen, device=ctx.device)
        out[a : a + len(x)] = F.normalize(x, dim=1).half()
    return out


def _kernel_seconds(ctx: Context, docs, queries, k: int) -> float:
    """``torch.mm`` + ``topk`` over device-resident vectors in query chunks (the library's
    DEVICE_BATCH), float16 on a GPU, float32 on the CPU."""
    import torch

    from llmret.retrieval.dense_search import DEVICE_BATCH

    dtype = torch.float16 if ctx.gpu else torch.float32
    d, q = docs.to(dtype), queries.to(dtype)
    synchronize(ctx.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(q), DEVICE_BATCH):
            torch.topk(torch.mm(q[a : a + DEVICE_BATCH], d.T), k, dim=1)
    synchronize(ctx.device)
    return time.perf_counter() - t0


def same_up_to_ties(a, b, queries, docs, tol: float) -> dict:
    """Two top-k row lists agree up to ties when, query by query, their exact (float64)
    scores sorted best first differ by at most ``tol`` at every rank."""
    import numpy as np

    exact = (a == b).all(axis=1)
    gap = 0.0
    for i in np.flatnonzero(~exact):
        q = queries[i].astype(np.float64)
        sa = np.sort(docs[a[i]].astype(np.float64) @ q)[::-1]
        sb = np.sort(docs[b[i]].astype(np.float64) @ q)[::-1]
        gap = max(gap, float(np.abs(sa - sb).max()))
    return {"rows_identical": int(exact.sum()), "rows": len(a), "max_score_gap": gap, "ok": gap <= tol}


def _faiss_row(ctx: Context, folder, docs_np, q_np, qids) -> dict:
    """FAISS's flat inner product on the CPU (the library's exact search) on a subset, scaled
    up to the full size, and its ids against the torch search of the same subset."""
    from llmret.retrieval.dense_search import exact_search_shards, torch_search_shards

    try:
        import faiss
    except ImportError as e:
        return row("search faiss-cpu vs torch", False, f"faiss not importable here: {e}")
    s = ctx.sizes
    m, mq = s.subset_vectors, s.subset_queries
    sub = ([folder / "sub.npy"], [folder / "sub.ids"], q_np[:mq], qids[:mq], s.k)
    t0 = time.perf_counter()
    on_cpu, _ = exact_search_shards(*sub, show_progress=False)
    faiss_s = time.perf_counter() - t0
    on_device, _ = torch_search_shards(*sub, device=ctx.device, show_progress=False)
    cmp = same_up_to_ties(on_cpu.tie, on_device.tie, q_np[:mq], docs_np[:m], 1e-3 if ctx.gpu else 1e-5)
    scale = (s.vectors / m) * (s.queries / mq)
    text = (
        f"faiss-cpu flat IP ({faiss.omp_get_max_threads()} threads) on {m:,} vectors x {mq:,} queries: "
        f"{faiss_s:.2f} s, ~{faiss_s * scale:,.0f} s scaled x{scale:.0f} to the full size; ids vs torch: "
        f"{cmp['rows_identical']}/{cmp['rows']} rows identical, max score gap {cmp['max_score_gap']:.1g} "
        f"-> {'equal up to ties' if cmp['ok'] else 'DIFFERENT'}"
    )
    return row("search faiss-cpu vs torch", cmp["ok"], text, faiss_s=faiss_s, scaled_s=faiss_s * scale, **cmp)


def search(ctx: Context) -> list[dict]:
    import torch

    from llmret.retrieval.dense_search import torch_search_shards
    from llmret.retrieval.faiss_index import save_embeddings

    s, folder = ctx.sizes, ctx.work / "search"
    dim, n, nq, m = s.hidden, s.vectors, s.queries, s.subset_vectors
    gen = torch.Generator(device=ctx.device).manual_seed(SEED)
    docs, queries = _unit_vectors(ctx, n, dim, gen), _unit_vectors(ctx, nq, dim, gen)
    kernel_s = _kernel_seconds(ctx, docs, queries, s.k)
    docs_np, q_np = docs.cpu().numpy(), queries.float().cpu().numpy()
    del docs, queries
    if ctx.gpu:
        torch.cuda.empty_cache()
    ids, qids = [f"d{i}" for i in range(n)], [f"q{i}" for i in range(nq)]
    save_embeddings(docs_np, ids, folder / "all.npy", folder / "all.ids", dtype="float16")
    save_embeddings(docs_np[:m], ids[:m], folder / "sub.npy", folder / "sub.ids", dtype="float16")
    t0 = time.perf_counter()
    torch_search_shards([folder / "all.npy"], [folder / "all.ids"], q_np, qids, s.k, ctx.device, show_progress=False)
    library_s = time.perf_counter() - t0
    where = "GPU float16" if ctx.gpu else "CPU float32"
    text = (
        f"{n:,} x {dim} vectors, {nq:,} queries, top-{s.k}, {where}: torch.mm+topk {kernel_s:.2f} s on device data "
        f"({nq / kernel_s:,.0f} queries/s); llmret torch_search_shards from a .npy shard {library_s:.1f} s"
    )
    rows = [row("search torch", True, text, kernel_s=kernel_s, library_s=library_s)]
    rows.append(_faiss_row(ctx, folder, docs_np, q_np, qids))
    shutil.rmtree(folder, ignore_errors=True)
    return rows
