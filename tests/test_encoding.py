import numpy as np
import pytest
import torch

from llmret.retrieval.encoder import EncoderSpec, TextEncoder

LLARA = EncoderSpec(
    pooling="last",
    query_template="{text} The next sentence:",
    passage_template="{text} The original sentence:",
    append_eos=True,
    max_query_length=16,
    max_passage_length=24,
    batch_tokens=64,
)
TEXTS = [
    "Aspirin lowers the risk of heart attack in adults over fifty.",
    "Cats",
    "The mitochondrion is the powerhouse of the cell, producing most of the ATP a cell needs to live and divide.",
    "Vitamin D deficiency is common in northern latitudes during winter.",
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return TextEncoder(str(smollm2_dir), LLARA, threads=2)


@pytest.mark.slow
def test_truncation_keeps_prompt_and_eos(llm):
    ids = llm.tokenize(TEXTS, "passage")
    tok = llm.tokenizer
    suffix = tok(" The original sentence:", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for row in ids:
        assert row[-len(suffix) :] == suffix
        assert len(row) <= LLARA.max_passage_length
    assert len(ids[2]) == LLARA.max_passage_length  # the long text was cut, not the prompt
    assert tok.decode(ids[1]) == "Cats The original sentence:" + tok.eos_token


@pytest.mark.slow
def test_bucketed_batches_equal_one_at_a_time(llm):
    batched = llm.encode(TEXTS, "passage", show_progress=False)
    single = np.stack([llm.encode([t], "passage", show_progress=False)[0] for t in TEXTS])
    # Padding and batch composition must not change a text's vector (fp32 on CPU).
    np.testing.assert_allclose(batched, single, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in batched}) == len(TEXTS)


@pytest.mark.slow
def test_last_token_is_the_eos_hidden_state(llm, smollm2_dir):
    from transformers import AutoModel

    ids = llm.tokenize(TEXTS[:1], "query")[0]
    model = AutoModel.from_pretrained(smollm2_dir).eval()
    with torch.inference_mode():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    expected = torch.nn.functional.normalize(h, dim=-1).numpy()
    np.testing.assert_allclose(llm.encode(TEXTS[:1], "query", show_progress=False)[0], expected, atol=1e-5)


@pytest.mark.slow
def test_batches_respect_token_budget(llm):
    lengths = [10, 3, 7, 10, 2, 9]
    plan = llm.batches(lengths)
    assert sorted(i for b in plan for i in b) == list(range(6))
    for b in plan:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= LLARA.batch_tokens
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


@pytest.mark.slow
def test_minilm_mean_pooling_matches_reference(minilm_dir):
    """Our special-token framing must give what the tokenizer's own call gives."""
    from transformers import AutoModel, AutoTokenizer

    spec = EncoderSpec(pooling="mean", append_eos=False, max_passage_length=16)
    ours = TextEncoder(str(minilm_dir), spec).encode(TEXTS, "passage", show_progress=False)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_spec_errors():
    with pytest.raises(ValueError, match="must contain '\\{text\\}' exactly once"):
        EncoderSpec(query_template="no placeholder")
    with pytest.raises(ValueError, match="unknown encoder settings"):
        EncoderSpec.from_config({"poolin": "last"})


@pytest.mark.slow
def test_max_length_too_small_is_named(llm):
    tiny = TextEncoder.__new__(TextEncoder)
    tiny.__dict__.update(llm.__dict__)
    tiny.spec = EncoderSpec(passage_template="{text} The original sentence:", max_passage_length=4)
    with pytest.raises(ValueError, match="max_passage_length=4 leaves no room"):
        tiny.tokenize(["x"], "passage")


def test_device_for_gpus(monkeypatch):
    import torch

    from llmret.retrieval.encoder import device_for

    assert device_for(0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="asked for 2 GPU"):
        device_for(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(1) == "cuda"


@pytest.mark.slow
def test_quantized_dense_encoder_stays_close_and_reports_its_precision(llm, smollm2_dir):
    """Weight-only int8 and int4 of every Linear layer: the embeddings keep their direction
    (measured cosine to float32 on these texts: int8 >= 0.999, int4 0.88-0.90), the stats
    name the precision and count fewer weight bytes."""
    from dataclasses import replace

    from llmret.retrieval.encoder import encode_stats

    ref = llm.encode(TEXTS, "passage", show_progress=False)
    full = encode_stats(len(TEXTS), 1.0, llm.spec, llm.model, "cpu")
    assert full.precision == "float32" and full.texts_per_second == len(TEXTS)
    for quantize, floor in (("int8", 0.999), ("int4", 0.85)):
        spec = replace(LLARA, quantize=quantize)
        enc = TextEncoder(str(smollm2_dir), spec, threads=2)
        got = enc.encode(TEXTS, "passage", show_progress=False)
        cosine = (ref * got).sum(1)  # both L2-normalised
        assert cosine.min() >= floor and not np.array_equal(ref, got), (quantize, cosine)
        stats = encode_stats(len(TEXTS), 2.0, enc.spec, enc.model, "cpu")
        assert stats.precision == quantize and stats.weight_bytes < full.weight_bytes
