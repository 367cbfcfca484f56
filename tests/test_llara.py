import math

import pytest
import torch

from llmret.llara import (
    NEXT,
    PAD,
    SELF,
    TEXT,
    LlaraModel,
    LlaraObjective,
    additive_mask,
    bow_loss,
    bow_targets,
    build_joint_inputs,
    build_training_batch,
    embeddings_from_hidden,
    joint_allowed,
    split_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "Cats purr when they are happy.",
    "The quick brown fox jumps over the lazy dog near the river bank in the early morning.",
    "Hi",
]
# fp32 on CPU: the joint and separate passes differ only in summation order over masked
# (exactly zero-weighted) keys and padding; measured ~2e-5 on hidden values of magnitude ~10.
TOL = 1e-4


def _lm(path, impl):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def lm(request, smollm2_dir):
    return _lm(smollm2_dir, request.param)


def _separate(lm, tok, text, prompt):
    ids = tok(text, add_special_tokens=False)["input_ids"] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids + [tok.eos_token_id]])).last_hidden_state[0, -1]


def test_joint_pass_equals_two_separate_passes(lm, tok):
    obj = LlaraObjective()
    batch = build_joint_inputs(tok, TEXTS, obj)
    assert (batch.segments == PAD).any(), "the batch must contain padding for this test to mean anything"
    with torch.no_grad():
        ebae, ebar = LlaraModel(lm, obj).embed(batch)
    for i, text in enumerate(TEXTS):
        want_ae = _separate(lm, tok, text, obj.ebae_prompt)
        want_ar = _separate(lm, tok, text, obj.ebar_prompt)
        assert (ebae[i] - want_ae).abs().max().item() < TOL
        assert (ebar[i] - want_ar).abs().max().item() < TOL
    # The two embeddings of one text differ: each saw its own prompt only.
    assert (ebae - ebar).abs().max().item() > 0.1


def test_default_causal_mask_would_leak_self_into_next(lm, tok):
    """Guards the test above: without the custom mask the EBAR embedding is measurably off."""
    batch = build_joint_inputs(tok, TEXTS[:1])
    with torch.no_grad():
        hidden = lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    _, leaky = embeddings_from_hidden(hidden, batch)
    want = _separate(lm, tok, TEXTS[0], LlaraObjective().ebar_prompt)
    assert (leaky[0] - want).abs().max().item() > 100 * TOL


def _perturbed(batch, segment, new_id):
    ids = batch.input_ids.clone()
    where = (batch.segments == segment) & (ids != 2)  # keep the </s> tokens in place
    ids[where] = new_id
    return type(batch)(**{**batch.__dict__, "input_ids": ids})


def test_self_and_next_segments_are_mutually_invisible(lm, tok):
    model = LlaraModel(lm)
    batch = build_joint_inputs(tok, TEXTS)
    with torch.no_grad():
        ae, ar = model.embed(batch)
        ae_s, ar_s = model.embed(_perturbed(batch, SELF, 1000))
        ae_n, ar_n = model.embed(_perturbed(batch, NEXT, 1000))
        ae_t, ar_t = model.embed(_perturbed(batch, TEXT, 1000))
    assert (ae_s - ae).abs().max() > 1e-2 and (ar_s - ar).abs().max() < 1e-5
    assert (ar_n - ar).abs().max() > 1e-2 and (ae_n - ae).abs().max() < 1e-5
    assert (ae_t - ae).abs().max() > 1e-2 and (ar_t - ar).abs().max() > 1e-2  # both read the text


def test_layout_positions_and_mask(tok):
    obj = LlaraObjective(max_text_length=5)
    batch = build_joint_inputs(tok, TEXTS, obj)
    n_self = len(tok(obj.ebae_prompt, add_special_tokens=False)["input_ids"]) + 1
    n_next = len(tok(obj.ebar_prompt, add_special_tokens=False)["input_ids"]) + 1
    for b in range(len(TEXTS)):
        seg, pos = batch.segments[b], batch.position_ids[b]
        n_text = int((seg == TEXT).sum())
        assert n_text == min(5, len(tok(TEXTS[b], add_special_tokens=False)["input_ids"]))
        assert batch.text_ids[b] == batch.input_ids[b, :n_text].tolist()
        assert pos[seg == SELF].tolist() == list(range(n_text, n_text + n_self))
        assert pos[seg == NEXT].tolist() == list(range(n_text, n_text + n_next))  # restarts
        assert pos[seg == TEXT].tolist() == list(range(n_text))
        assert batch.ebae_index[b] == n_text + n_self - 1 and batch.ebar_index[b] == n_text + n_self + n_next - 1
        assert batch.input_ids[b, batch.ebae_index[b]] == tok.eos_token_id
        assert batch.input_ids[b, batch.ebar_index[b]] == tok.eos_token_id
    m = batch.attention_mask
    assert m.shape == (3, 1, batch.input_ids.shape[1], batch.input_ids.shape[1]) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert (m == 0).any(-1).all(), "no fully masked query row"


def test_joint_allowed_rules():
    T, S, N, P = TEXT, SELF, NEXT, PAD
    seg = torch.tensor([[T, T, S, S, N, N, P]])
    got = joint_allowed(seg)[0].int().tolist()
    assert got == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # NEXT sees text, not SELF
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # a pad query sees only itself
    ]
    with pytest.raises(ValueError, match="attends to nothing"):
        additive_mask(torch.zeros(1, 2, 2, dtype=torch.bool))


def test_bow_targets_dedup_and_exclusions(tok):
    assert bow_targets([[3, 3, 4, 0, 2], [0, 0], [1]], 6, exclude_ids=[0, 2]).tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
    ]
    with pytest.raises(ValueError):
        bow_targets([[9]], 6)

    texts = ["the cat the cat<|im_end|>", "Hi"]
    nxt = ["dog dog<|endoftext|>", "a longer next text with several words"]
    batch = build_training_batch(tok, texts, nxt, vocab_size=len(tok))
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in ids  # the special token reached the text ...
    assert batch.ebae_targets[0, tok.eos_token_id] == 0  # ... but not the target
    for sid in tok.all_special_ids + [tok.pad_token_id]:
        assert batch.ebae_targets[:, sid].sum() == 0 and batch.ebar_targets[:, sid].sum() == 0
    assert batch.ebae_targets[0].sum() == len(set(ids) - set(tok.all_special_ids))
    assert batch.ebae_targets.max() == 1 and batch.ebar_targets.max() == 1
    assert batch.ebar_targets[0].nonzero().flatten().tolist() == sorted(
        set(tok("dog dog", add_special_tokens=False)["input_ids"])
    )


def test_bow_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, 0.0, 0.0], [5.0, 0, 0, 0, 0]])
    targets = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])  # row 3: empty, ignored

    def logp(row, t):
        z = sum(math.exp(v) for v in logits[row].tolist())
        return logits[row, t].item() - math.log(z)

    want = (-(logp(0, 0) + logp(0, 3)) / 2 - logp(1, 2)) / 2
    assert bow_loss(logits, targets).item() == pytest.approx(want, rel=1e-6)
    assert bow_loss(logits[2:], targets[2:]).item() == 0.0


def test_projection_copy_and_tie(smollm2_dir, tok):
    lm = _lm(smollm2_dir, "sdpa")
    copy = LlaraModel(lm, head="copy")
    assert copy.projection.weight is not lm.lm_head.weight
    assert torch.equal(copy.projection.weight, lm.lm_head.weight)
    tie = LlaraModel(lm, head="tie")
    assert tie.projection.weight is lm.lm_head.weight
    with pytest.raises(ValueError):
        LlaraModel(lm, head="fresh")
    lm.config._attn_implementation = "flash_attention_2"  # never honours the 4-D mask
    with pytest.raises(ValueError, match="attn_implementation"):
        copy.embed(build_joint_inputs(tok, ["x"]))


def test_loss_goes_down(smollm2_dir, tok):
    torch.manual_seed(0)
    lm = _lm(smollm2_dir, "sdpa")
    model = LlaraModel(lm, LlaraObjective(max_text_length=32))
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.projection.weight, *lm.model.layers[-1].parameters(), *lm.model.norm.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    texts = ["Water boils at one hundred degrees.", "Paris is the capital of France.", "Bees make honey."]
    nxt = ["Ice melts at zero degrees.", "Berlin is the capital of Germany.", "Honey is sweet and sticky."]
    batch = build_training_batch(tok, texts, nxt, vocab_size=lm.config.vocab_size, objective=model.objective)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    losses = []
    for _ in range(6):
        out = model(batch)
        assert out["loss"].item() == pytest.approx((out["loss_ebae"] + out["loss_ebar"]).item(), rel=1e-6)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    print("LLaRA losses:", [round(x, 3) for x in losses])
    assert out["ebae_emb"].shape == out["ebar_emb"].shape == (3, lm.config.hidden_size)
    assert losses[-1] < losses[0] - 0.5, losses


def test_split_pairs():
    doc = (
        "One two three four five six seven eight. "
        "Nine ten eleven twelve thirteen fourteen fifteen sixteen. "
        "A b c d e f g h i j."
    )
    # 26 words, middle 13: cuts after 8 and 16 words; 16 is closer.
    assert split_pairs(doc) == (
        "One two three four five six seven eight. Nine ten eleven twelve thirteen fourteen fifteen sixteen.",
        "A b c d e f g h i j.",
    )
    assert split_pairs(doc) == split_pairs(doc)  # deterministic
    assert split_pairs("Too short. Really.") is None
    # Closing quotes stay with their sentence.
    assert split_pairs('He said "stop it now." Then it stopped.', min_words=3) == (
        'He said "stop it now."',
        "Then it stopped.",
    )
    # No sentence end leaving min_words on both sides: fall back to the word midpoint, or None.
    run_on = " ".join(f"w{i}" for i in range(20))
    assert split_pairs(run_on) == (" ".join(f"w{i}" for i in range(10)), " ".join(f"w{i}" for i in range(10, 20)))
    assert split_pairs(run_on, word_fallback=False) is None
    lopsided = "Short one. " + " ".join(f"w{i}" for i in range(20))
    assert split_pairs(lopsided, word_fallback=False) is None
