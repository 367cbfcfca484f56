import json
import math

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

from llmret.llara.modeling import LlaraModel, bow_loss, embeddings_from_hidden, summary_logits
from llmret.llara.objective import (
    IGNORE,
    NEXT,
    PAD,
    SELF,
    TEXT,
    LlaraObjective,
    add_summary_tokens,
    bow_targets,
    build_joint_inputs,
    build_training_batch,
    encoder_settings,
    fit_embeddings,
    joint_allowed,
)
from llmret.llara.pairs import split_pairs
from llmret.retrieval.masks import additive_mask

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- FlagEmbedding variant

FLAG = LlaraObjective(variant="flagembedding", max_text_length=16)
NEXT_TEXTS = ["Dogs bark at night.", "Foxes sleep in dens.", "Bye now, see you."]


@pytest.fixture(scope="module")
def flag_tok(smollm2_dir):
    """A fresh SmolLM2 tokenizer with the 16 summary tokens (the session ``tok`` is shared: never add to it)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_dir)
    add_summary_tokens(t, FLAG)
    return t


def _tiny_lm(vocab_size: int, impl: str = "sdpa", seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size, attn_implementation=impl, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _summary_ids(tok, objective=FLAG) -> tuple[list[int], list[int]]:
    ebae, ebar = objective.summary_names()
    return tok.convert_tokens_to_ids(ebae), tok.convert_tokens_to_ids(ebar)


def test_flag_defaults_are_the_released_recipe():
    assert (FLAG.ebae_prompt, FLAG.ebar_prompt, FLAG.text_prefix) == (
        '", summarize the above passage within eight words: ',
        '", predict the following passage within eight words: ',
        '"',
    )
    assert (FLAG.ebae_weight, FLAG.ebar_weight, FLAG.lm_weight, FLAG.summary_tokens) == (0.05, 0.05, 1.0, 8)
    assert FLAG.summary_names() == ([f"<s{i}>" for i in range(1, 9)], [f"<s{i}>" for i in range(9, 17)])
    k3 = LlaraObjective(variant="flagembedding", summary_tokens=3, lm_weight=0.5, ebae_prompt=" Sum:")
    assert k3.summary_names() == (["<s1>", "<s2>", "<s3>"], ["<s4>", "<s5>", "<s6>"])
    assert (k3.lm_weight, k3.ebae_prompt, k3.ebar_weight) == (0.5, " Sum:", 0.05)
    paper = LlaraObjective()
    assert (paper.ebae_prompt, paper.text_prefix, paper.ebae_weight, paper.lm_weight) == (
        " The original sentence:",
        "",
        1.0,
        0.0,
    )
    assert paper.summary_names() == ([], [])
    with pytest.raises(ValueError, match="no LM term"):
        LlaraObjective(lm_weight=1.0)
    with pytest.raises(ValueError, match="variant"):
        LlaraObjective(variant="flag")
    with pytest.raises(ValueError, match="summary_tokens"):
        LlaraObjective(variant="flagembedding", summary_tokens=0)


@pytest.mark.slow
def test_flag_summary_tokens_are_added_once_and_placed(smollm2_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(ValueError, match="add_summary_tokens"):
        build_joint_inputs(t, TEXTS, FLAG)  # "<s1>" would be split into pieces
    size, specials = len(t), set(t.all_special_ids)
    assert add_summary_tokens(t, LlaraObjective()) == 0 and len(t) == size  # the paper adds none
    assert add_summary_tokens(t, FLAG) == 16 and len(t) == size + 16
    assert add_summary_tokens(t, FLAG) == 0 and len(t) == size + 16  # once
    ebae_ids, ebar_ids = _summary_ids(t)
    assert ebae_ids + ebar_ids == list(range(size, size + 16))
    assert set(t.all_special_ids) == specials | set(ebae_ids + ebar_ids)  # special; the old ones kept

    batch = build_training_batch(t, TEXTS, NEXT_TEXTS, len(t), FLAG)
    prefix = t('"', add_special_tokens=False)["input_ids"]
    for b, text in enumerate(batch.text_ids):
        row, seg, pos = batch.input_ids[b], batch.segments[b], batch.position_ids[b]
        n = len(prefix) + len(text)
        self_at, next_at = (seg == SELF).nonzero().flatten(), (seg == NEXT).nonzero().flatten()
        assert row[:n].tolist() == prefix + text and (seg[:n] == TEXT).all()
        assert self_at[0] == n and next_at[0] == self_at[-1] + 1
        # <s1..s8> end SELF, <s9..s16> end NEXT, each exactly once, and no </s> anywhere.
        assert batch.ebae_summary[b].tolist() == self_at[-8:].tolist()
        assert batch.ebar_summary[b].tolist() == next_at[-8:].tolist()
        assert row[batch.ebae_summary[b]].tolist() == ebae_ids and row[batch.ebar_summary[b]].tolist() == ebar_ids
        assert row[self_at].tolist() == t(FLAG.ebae_prompt + "<s1><s2><s3><s4><s5><s6><s7><s8>")["input_ids"]
        used = row[seg != PAD].tolist()
        assert all(used.count(i) == 1 for i in ebae_ids + ebar_ids) and t.eos_token_id not in used
        assert pos[next_at].tolist() == list(range(n, n + len(next_at)))  # restarts at SELF's start
        assert batch.ebae_index[b] == self_at[-1] and batch.ebar_index[b] == next_at[-1]
        # LM labels: the text ids at the text positions only.
        assert batch.lm_labels[b, len(prefix) : n].tolist() == text
        assert (batch.lm_labels[b, : len(prefix)] == IGNORE).all() and (batch.lm_labels[b, n:] == IGNORE).all()
    assert (
        batch.ebae_targets[:, ebae_ids + ebar_ids].sum() == 0 and batch.ebar_targets[:, ebae_ids + ebar_ids].sum() == 0
    )
    paper = build_joint_inputs(t, TEXTS)
    assert paper.ebae_summary is None and paper.lm_labels is None


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_flag_joint_pass_equals_two_separate_passes(flag_tok, impl):
    lm = _tiny_lm(len(flag_tok), impl)
    batch = build_joint_inputs(flag_tok, TEXTS, FLAG)
    assert (batch.segments == PAD).any()
    with torch.no_grad():
        joint = LlaraModel(lm, FLAG).hidden(batch)
        leaky = lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    leak = 0.0
    for b in range(len(TEXTS)):
        row, seg = batch.input_ids[b], batch.segments[b]
        shared = row[seg == TEXT]
        for part in (SELF, NEXT):
            alone = torch.cat([shared, row[seg == part]])[None]
            with torch.no_grad():
                want = lm.model(input_ids=alone).last_hidden_state[0, len(shared) :]
            assert (joint[b, seg == part] - want).abs().max().item() < TOL
            if part == NEXT:
                leak = max(leak, (leaky[b, seg == part] - want).abs().max().item())
    assert leak > 100 * TOL, "without the 4-D mask NEXT would read SELF: the check above must be able to fail"
    ebae, ebar = LlaraModel(lm, FLAG).embed(batch)
    assert torch.allclose(ebae[0], joint[0, batch.ebae_summary[0]].mean(0))  # the mean of the 8 states
    assert (ebae - ebar).abs().max().item() > 1e-3


def test_summary_logits_max_pool_by_hand():
    # Row 0 keeps positions 0 and 2, row 1 positions 1 and 3: the large states are never read.
    hidden = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [9.0, 9.0, 9.0], [2.0, 1.0, -1.0], [9.0, 9.0, 9.0]],
            [[7.0, 7.0, 7.0], [-1.0, 4.0, 0.0], [7.0, 7.0, 7.0], [0.5, -2.0, 1.0]],
        ]
    )
    index = torch.tensor([[0, 2], [1, 3]])
    proj = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, -1]]))
    # logits: row 0 [1,0,1,0] and [2,1,3,1]; row 1 [-1,4,3,0] and [0.5,-2,-1.5,-1]. Max per column,
    # which is not the logits of the max state (row 0 would give [2,1,3,0]).
    assert summary_logits(hidden, index, proj).tolist() == [[2.0, 1.0, 3.0, 1.0], [0.5, 4.0, 3.0, 0.0]]


@pytest.mark.slow
def test_flag_losses_against_references(flag_tok):
    """loss_lm = HF's own ``labels=`` loss on ``prefix + text``; loss_ebae/ebar = the released
    formula written out per row; loss = 0.05 * ebae + 0.05 * ebar + lm."""
    import torch.nn.functional as F

    lm = _tiny_lm(len(flag_tok))
    model = LlaraModel(lm, FLAG, head="tie")
    batch = build_training_batch(flag_tok, TEXTS, NEXT_TEXTS, lm.config.vocab_size, FLAG)
    with torch.no_grad():
        out = model(batch)
        hidden = model.hidden(batch)

    prefix = flag_tok('"', add_special_tokens=False)["input_ids"]
    rows = [prefix + t for t in batch.text_ids]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
        labels[b, len(prefix) : len(r)] = torch.tensor(batch.text_ids[b])
    with torch.no_grad():
        want_lm = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert out["loss_lm"].item() == pytest.approx(want_lm.item(), rel=1e-5)

    def released_bow(summary, targets):
        per = []
        for b in range(len(TEXTS)):
            p = F.log_softmax(lm.lm_head(hidden[b, summary[b]]).max(dim=0).values, dim=-1)
            per.append(-p[targets[b].nonzero().flatten()].mean())
        return torch.stack(per).mean()

    want_ae = released_bow(batch.ebae_summary, batch.ebae_targets)
    want_ar = released_bow(batch.ebar_summary, batch.ebar_targets)
    assert out["loss_ebae"].item() == pytest.approx(want_ae.item(), rel=1e-5)
    assert out["loss_ebar"].item() == pytest.approx(want_ar.item(), rel=1e-5)
    # The release: ar_loss + (ebae / 10 + ebar / 10) / 2.
    want = want_lm + (want_ae / 10 + want_ar / 10) / 2
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="not built for"):
        LlaraModel(lm)(batch)


@pytest.mark.slow
def test_flag_loss_goes_down(flag_tok):
    lm = _tiny_lm(len(flag_tok))
    model = LlaraModel(lm, FLAG, head="tie")
    batch = build_training_batch(flag_tok, TEXTS, NEXT_TEXTS, lm.config.vocab_size, FLAG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        out = model(batch)
        want = 0.05 * out["loss_ebae"] + 0.05 * out["loss_ebar"] + out["loss_lm"]
        assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append((out["loss"].item(), out["loss_lm"].item(), out["loss_ebae"].item(), out["loss_ebar"].item()))
    print("flagembedding losses (total, lm, ebae, ebar):", [tuple(round(x, 3) for x in r) for r in losses])
    assert losses[-1][0] < losses[0][0] - 0.5
    assert all(last < first for first, last in zip(losses[0][1:], losses[-1][1:], strict=True))  # every term learns


@pytest.mark.slow
def test_fit_embeddings_only_grows(flag_tok):
    lm = _tiny_lm(len(flag_tok) - 16)
    assert fit_embeddings(lm, flag_tok)
    assert lm.get_input_embeddings().num_embeddings == lm.config.vocab_size == len(flag_tok)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied
    padded = _tiny_lm(len(flag_tok) + 40)
    assert not fit_embeddings(padded, flag_tok) and padded.config.vocab_size == len(flag_tok) + 40


@pytest.mark.slow
def test_flag_encoder_pools_the_trained_summary_tokens(tmp_path, flag_tok):
    """The dense-system settings written to llara.json feed the encoder the ids training used
    (prefix + text + SELF or NEXT segment) and pool the mean of the summary-token states."""
    from llmret.llara.modeling import save_llara
    from llmret.retrieval.encoder import EncoderSpec, TextEncoder

    lm = _tiny_lm(len(flag_tok))
    model = LlaraModel(lm, FLAG, head="tie")
    save_llara(model, tmp_path)
    flag_tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "llara.json").read_text())
    assert saved["encoder"] == encoder_settings(FLAG) and saved["encoder"]["pooling"] == "mean_last_8"
    assert saved["objective"]["variant"] == "flagembedding"
    assert saved["encoder"]["passage_template"].endswith("words: <s1><s2><s3><s4><s5><s6><s7><s8>")

    texts = ["Cats purr.", "Hi", "Bees make honey."]  # shorter than max_text_length: no cut anywhere
    enc = TextEncoder(str(tmp_path), EncoderSpec(**saved["encoder"], normalize=False))
    batch = build_joint_inputs(flag_tok, texts, FLAG)
    with torch.no_grad():
        ebae, ebar = model.embed(batch)
    for kind, part, want in (("passage", SELF, ebae), ("query", NEXT, ebar)):
        ids = enc.tokenize(texts, kind)
        for b in range(len(texts)):
            seg, row = batch.segments[b], batch.input_ids[b]
            assert ids[b] == row[seg == TEXT].tolist() + row[seg == part].tolist()
        got = torch.from_numpy(enc.encode(texts, kind, show_progress=False))
        assert (got - want).abs().max().item() < TOL
