"""RepLLaMA-style LoRA fine-tuning: loss, sampling, batch layout, LoRA wiring, saving, DeepSpeed run.

Model tests use SmolLM2-135M (one thread, short sequences); LoRA/checkpointing wiring uses a
tiny random Llama. Embedding comparisons are fp32 on CPU with tolerance 1e-4 (max abs).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config

from llmret.finetuning.repllama import FINETUNE_JSON, ContrastiveModel, FinetuningSpec, finetune, save_finetuned
from llmret.retrieval.encoder import EncoderSpec, TextEncoder
from llmret.training.contrastive import (
    GroupCollator,
    LazyGroups,
    TrainGroup,
    check_negatives,
    count_tokens,
    gather_with_grad,
    groups_from_records,
    info_nce,
    load_groups,
    mean_pairwise_cosine,
    sample_group,
    top1_accuracy,
)
from llmret.training.lora import ADAPTER, LoraSpec, apply_lora, load_adapter_model, publish_adapter

pytestmark = pytest.mark.usefixtures("one_thread", "clean_process_state")

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOL = 1e-4  # max abs difference between fp32 embeddings computed by different code paths

RECORDS = [
    {
        "query_id": "q1",
        "query": "what do cats eat",
        "positive_passages": [{"docid": "d1", "title": "Cats", "text": "Cats are carnivores that eat meat and fish."}],
        "negative_passages": [
            {"docid": "d5", "title": "Stocks", "text": "The stock market fell sharply on Monday."},
            {"docid": "d6", "title": "", "text": "Rain is expected across the north tomorrow."},
            {"docid": "d7", "title": "Piano", "text": "A piano has eighty-eight keys."},
        ],
    },
    {
        "query_id": "q2",
        "query": "how tall is mount everest",
        "positive_passages": [{"docid": "d2", "title": "Everest", "text": "Mount Everest is 8849 metres high."}],
        "negative_passages": [{"docid": "d8", "title": "Bread", "text": "Bread is baked from flour, water and yeast."}],
    },
    {
        "query_id": "q3",
        "query": "who wrote hamlet",
        "positive_passages": [
            {"docid": "d3", "title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare."},
            {"docid": "d9", "title": "Shakespeare", "text": "Shakespeare wrote Hamlet around 1600."},
        ],
        "negative_passages": [{"docid": "d10", "title": "Volcano", "text": "Volcanoes erupt molten rock."}],
    },
    {
        "query_id": "q4",
        "query": "boiling point of water",
        "positive_passages": [{"docid": "d4", "title": "Water", "text": "Water boils at 100 degrees Celsius."}],
        "negative_passages": [{"docid": "d11", "title": "Chess", "text": "Chess is played on an 8x8 board."}],
    },
]

SPEC = FinetuningSpec(max_query_length=16, max_passage_length=24, group_size=2)


# --------------------------------------------------------------------------- settings and data


def test_specs_validate_and_read_config():
    spec = FinetuningSpec.from_config({"group_size": 4, "temperature": 0.05})
    assert (spec.group_size, spec.temperature, spec.query_template) == (4, 0.05, "query: {text}")
    assert EncoderSpec(**spec.encoder_settings()).passage_template == "passage: {text}"
    with pytest.raises(ValueError, match=r"unknown fine-tuning settings: \['groupsize'\]"):
        FinetuningSpec.from_config({"groupsize": 4})
    with pytest.raises(ValueError, match="exactly once"):
        FinetuningSpec(query_template="query:")
    with pytest.raises(ValueError, match="temperature"):
        FinetuningSpec(temperature=0)
    with pytest.raises(ValueError, match="no negative"):
        FinetuningSpec(group_size=1, in_batch_negatives=False)
    lora = LoraSpec.from_config({"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert lora.target_modules == ("q_proj", "v_proj")  # YAML list -> tuple: the spec stays hashable
    with pytest.raises(ValueError, match="dropout"):
        LoraSpec(dropout=1.0)


def test_groups_from_records_join_title_and_check_negatives():
    groups = groups_from_records(RECORDS)
    assert groups[0].positives == ("Cats Cats are carnivores that eat meat and fish.",)
    assert groups[0].negatives[1] == "Rain is expected across the north tomorrow."  # empty title: text only
    assert len(groups[2].positives) == 2
    with pytest.raises(ValueError, match="'q9' has no positive"):
        groups_from_records([{**RECORDS[0], "query_id": "q9", "positive_passages": []}])
    bare = [TrainGroup("q9", "x", ("p",), ())]
    check_negatives(bare, 1)  # group of one: only in-batch negatives, fine
    with pytest.raises(ValueError, match=r"1 queries have no negative passage for group_size=2: \['q9'\]"):
        check_negatives(bare, 2)


# --------------------------------------------------------------------------- loss


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # groups of 2, positives rows 0 and 2
    t, e2 = 0.5, math.exp(2.0)
    # scores / t: q0 -> [2, 0, 0, 2] (target 0), q1 -> [0, 0, 2, 2] (target 2)
    in_batch = ((math.log(2 * e2 + 2) - 2) + (math.log(2 + 2 * e2) - 2)) / 2
    own_group = ((math.log(e2 + 1) - 2) + (math.log(2 * e2) - 2)) / 2  # q0: [2, 0]; q1: [2, 2]
    assert info_nce(q, p, t, 2).item() == pytest.approx(in_batch, rel=1e-6)
    assert info_nce(q, p, t, 2, in_batch=False).item() == pytest.approx(own_group, rel=1e-6)
    # q0 as the second query of the global batch (as rank 1 of two would hold it): its positive is row 2,
    # its own group rows 2-3 (scores [0, 2]).
    assert info_nce(q[:1], p, t, 2, offset=1).item() == pytest.approx(math.log(2 * e2 + 2), rel=1e-6)
    assert info_nce(q[:1], p, t, 2, in_batch=False, offset=1).item() == pytest.approx(math.log(1 + e2), rel=1e-6)
    with pytest.raises(ValueError, match="do not hold groups"):
        info_nce(q, p[:3], t, 2)


def _gather_worker(rank: int, store: str, out: str) -> None:
    """Rank ``rank`` of 2: local queries against gathered passages; gradients averaged as DeepSpeed does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        w, xq, xp = _toy_problem()
        q = torch.nn.functional.normalize(xq[2 * rank : 2 * rank + 2] @ w, dim=-1)
        p = torch.nn.functional.normalize(xp[4 * rank : 4 * rank + 4] @ w, dim=-1)
        p_all, first = gather_with_grad(p)
        loss = info_nce(q, p_all, 0.1, 2, offset=first // 2)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        stats = torch.tensor([loss.item()])
        dist.all_reduce(stats)
        if rank == 0:
            torch.save({"grad": grad / 2, "loss": stats / 2}, out)
        else:
            assert first == 4 and p_all.shape == (8, 3)
        # Both ranks leave together: gloo aborts a rank ("terminate called without an active
        # exception") when its peer tears the group down while a pair is still open.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _toy_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g).requires_grad_()
    return w, torch.randn(4, 3, generator=g), torch.randn(8, 3, generator=g)


def test_collapse_diagnostics_match_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # cosines: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2 -> mean over the 3 pairs
    assert mean_pairwise_cosine(x) == pytest.approx((2 / math.sqrt(2)) / 3)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two rows"):
        mean_pairwise_cosine(x[:1])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # groups of 2, positive first
    assert top1_accuracy(q, p, 2) == 0.5  # query 1's positive (row 2) ties row 1, which argmax takes
    assert top1_accuracy(q, p[[0, 3, 2, 1]], 2) == 1.0


def test_two_ranks_give_the_single_process_loss_and_gradient(tmp_path):
    import torch.multiprocessing as mp

    w, xq, xp = _toy_problem()
    q = torch.nn.functional.normalize(xq @ w, dim=-1)
    p = torch.nn.functional.normalize(xp @ w, dim=-1)
    assert gather_with_grad(p)[0] is p  # no process group: identity
    loss = info_nce(q, p, 0.1, 2)
    loss.backward()
    out = tmp_path / "rank0.pt"
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(got["grad"], w.grad, rtol=1e-5, atol=1e-7)


def _tevatron_file(path, records, blank_lines=True):
    """JSONL with non-ASCII text, blank lines between records and no final newline."""
    rows = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(rows), encoding="utf-8")
    return path


MANY = [
    {
        **RECORDS[i % 4],
        "query_id": f"q{i}",
        "query": f"{RECORDS[i % 4]['query']} · {i}",
        "negative_passages": RECORDS[i % 4]["negative_passages"][: 1 + i % 3],
    }
    for i in range(40)
]


def test_lazy_groups_equal_the_eager_ones_and_hold_only_offsets(tmp_path):
    from llmret.training.mining import read_tevatron

    path = _tevatron_file(tmp_path / "negatives.jsonl", MANY)
    lazy, eager = load_groups(path), groups_from_records(read_tevatron(path))
    assert isinstance(lazy, LazyGroups) and len(lazy) == len(eager) == 40
    assert list(lazy) == eager and lazy[-1] == eager[-1] and lazy[3:7] == eager[3:7]
    with pytest.raises(IndexError):
        lazy[40]
    # What a rank holds: the path and int64 arrays (byte ranges, line numbers), no group.
    held = vars(lazy)
    assert all(
        isinstance(v, np.ndarray) and v.dtype == np.int64 for k, v in held.items() if k.startswith("_") and k != "_size"
    )
    assert not any(isinstance(v, (list, tuple, dict, TrainGroup)) for v in held.values())
    assert lazy._lines.tolist() == list(range(1, 80, 2))  # blank lines between records are skipped
    # A gzip file cannot be read at an offset: it is read whole, to the same groups.
    import gzip

    packed = tmp_path / "negatives.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert load_groups(packed) == eager


@pytest.mark.slow
def test_lazy_groups_train_on_the_same_batches_as_the_eager_list(tmp_path, tok):
    """The same sampler over either gives the same groups and, with the same seed, the same
    sampled negatives: training (and every pinned score) cannot tell them apart."""
    from torch.utils.data import DataLoader

    from llmret.training.sampling import ResumableBatchSampler, seed_step

    path = _tevatron_file(tmp_path / "negatives.jsonl", MANY)
    spec = replace(SPEC, group_size=3)

    def batches(dataset, rank):
        sampler = ResumableBatchSampler(len(dataset), 4, seed=5, rank=rank, world_size=2, start=3)
        collator = GroupCollator(tok, spec)
        out = []
        for step, groups in zip(range(12), DataLoader(dataset, batch_sampler=sampler, collate_fn=list), strict=False):
            seed_step(5, step, rank)
            out.append((groups, collator.sample_texts(groups)))
        return out

    for rank in (0, 1):
        assert batches(LazyGroups(path), rank) == batches(groups_from_records(MANY), rank)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query_id": "q9", "query": "x"', "invalid JSON"),
        ('{"query_id": "q9", "query": "x", "positive_passages": []}', "missing key 'negative_passages'"),
        (
            '{"query_id": "q9", "query": "x", "positive_passages": [], "negative_passages": []}',
            "'positive_passages' is empty",
        ),
        (json.dumps(RECORDS[0]), "duplicate query id 'q1' \\(first on line 1\\)"),
        (b"\xff".decode("latin-1"), "not UTF-8|invalid JSON"),
    ],
)
def test_lazy_groups_validate_every_line_up_front_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "negatives.jsonl"
    path.write_bytes("\n".join([json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1])]).encode() + b"\n")
    with open(path, "ab") as f:
        f.write(line.encode("latin-1" if "\xff" in line else "utf-8") + b"\n")
    with pytest.raises(ValueError, match=rf"negatives.jsonl:4: ({message})"):
        LazyGroups(path)


def test_lazy_groups_check_negatives_and_notice_a_changed_file(tmp_path):
    bare = {**RECORDS[1], "query_id": "q9", "negative_passages": []}
    path = _tevatron_file(tmp_path / "negatives.jsonl", [RECORDS[0], bare], blank_lines=False)
    groups = LazyGroups(path)
    check_negatives(groups, 1)
    with pytest.raises(ValueError, match=r"1 queries have no negative passage for group_size=2: \['q9'\]"):
        check_negatives(groups, 2)
    path.write_text(path.read_text().replace('"q9"', '"q99"'))
    with pytest.raises(ValueError, match="changed after it was indexed"):
        groups[1]
    with pytest.raises(ValueError, match="no training queries"):
        LazyGroups(_tevatron_file(tmp_path / "empty.jsonl", []))


# --------------------------------------------------------------------------- sampling and batches


def test_negatives_without_replacement_when_enough_and_deterministic_with_random():
    group = TrainGroup("q", "query", ("pos a", "pos b"), tuple(f"neg {i}" for i in range(5)))
    seen = set()
    for seed in range(40):
        texts = sample_group(group, 5, random.Random(seed))
        assert texts[0] in group.positives and len(texts) == 5
        assert len(set(texts[1:])) == 4 and set(texts[1:]) <= set(group.negatives)
        seen.update(texts[1:])
    assert seen == set(group.negatives)  # really sampled, not the first four
    short = TrainGroup("q", "query", ("pos",), ("n1", "n2"))
    texts = sample_group(short, 6, random.Random(1))
    assert len(texts) == 6 and set(texts[1:]) <= {"n1", "n2"}  # too few: with replacement
    assert sample_group(short, 1, random.Random(1)) == ["pos"]
    # The global `random` module (reseeded by train() every step) fixes the choice.
    random.seed(123)
    first = [sample_group(group, 3) for _ in range(3)]
    random.seed(123)
    assert [sample_group(group, 3) for _ in range(3)] == first


@pytest.fixture(scope="module")
def encoder(smollm2_dir):
    """TextEncoder on the base model with the settings fine-tuning declares."""
    return TextEncoder(str(smollm2_dir), EncoderSpec(**SPEC.encoder_settings()))


@pytest.mark.slow
def test_collate_layout_matches_the_encoder(tok, encoder):
    spec = replace(SPEC, group_size=3)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 5)
    records = [RECORDS[0], RECORDS[1], {**RECORDS[2], "negative_passages": [{"title": "Fox", "text": long_text}]}]
    groups = groups_from_records(records)
    batch = GroupCollator(tok, spec, rng=random.Random(0))(groups)
    assert list(batch) == ["query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask"]
    assert batch["query_input_ids"].shape[0] == 3 and batch["passage_input_ids"].shape[0] == 9
    enc = encoder  # same templates and lengths as spec: TextEncoder.tokenize is the reference

    def rows(kind):
        ids, mask = batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]
        out = []
        for r, m in zip(ids.tolist(), mask.tolist(), strict=True):
            n = sum(m)
            assert m == [1] * n + [0] * (len(m) - n)  # right padding
            assert r[n:] == [tok.pad_token_id] * (len(r) - n) and r[n - 1] == tok.eos_token_id
            out.append(r[:n])
        return out

    assert rows("query") == enc.tokenize([g.query for g in groups], "query")
    assert tok.decode(rows("query")[0]) == "query: what do cats eat" + tok.eos_token
    passages = rows("passage")
    assert len(passages[7]) == len(passages[8]) == SPEC.max_passage_length  # long text cut, EOS kept
    for i, g in enumerate(groups):
        mine = passages[i * 3 : i * 3 + 3]
        pos = [enc.tokenize([t], "passage")[0] for t in g.positives]
        negs = [enc.tokenize([t], "passage")[0] for t in g.negatives]
        assert mine[0] in pos and all(r in negs for r in mine[1:])
    assert tok.decode(passages[0]).startswith("passage: Cats Cats are")
    assert passages[4] == passages[5]  # q2 has one negative: drawn twice (with replacement)
    assert count_tokens(batch) == sum(map(len, rows("query"))) + sum(map(len, passages))


# --------------------------------------------------------------------------- LoRA wiring


def _tiny_llama_model():
    from transformers import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(tiny_llama_config(64, max_position_embeddings=32))


def _tiny_batch(n: int = 2, group: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q = torch.randint(3, 64, (n, 6), generator=g)
    p = torch.randint(3, 64, (n * group, 9), generator=g)
    pm = torch.ones_like(p)
    pm[1, 6:] = 0  # one padded passage
    return {
        "query_input_ids": q,
        "query_attention_mask": torch.ones_like(q),
        "passage_input_ids": p,
        "passage_attention_mask": pm,
    }


def test_lora_only_on_named_targets_and_base_frozen():
    peft_model = apply_lora(_tiny_llama_model(), LoraSpec(r=4, target_modules=("q_proj", "down_proj")))
    wrapped = sorted({n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")})
    assert wrapped == ["down_proj", "q_proj"]
    assert sum(hasattr(m, "lora_A") for m in peft_model.modules()) == 4  # 2 layers x 2 targets
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 8
    with pytest.raises(ValueError, match=r"not in LlamaModel: \['qproj'\]"):
        apply_lora(_tiny_llama_model(), LoraSpec(target_modules=("q_proj", "qproj")))


def test_gradient_checkpointing_reaches_the_hf_model_and_keeps_lora_gradients():
    from llmret.training.loop import _enable_gradient_checkpointing

    spec = FinetuningSpec(group_size=2, temperature=0.1)
    model = ContrastiveModel(apply_lora(_tiny_llama_model(), LoraSpec(r=4, dropout=0.0)), spec, LoraSpec())
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    batch = _tiny_batch()

    def grads():
        model.zero_grad()
        model(**batch)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    _enable_gradient_checkpointing(model)
    base = model.encoder.get_base_model()
    assert all(layer.gradient_checkpointing for layer in base.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * 7  # 2 layers x 7 targets x (A, B)
    for n in plain:
        assert checkpointed[n].abs().sum() > 0, n
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_llara_checkpoint_loads_as_base(tmp_path):
    """A save_llara folder (LM + projection.safetensors + llara.json) is a valid base: AutoModel
    takes the LM's transformer and ignores the rest."""
    from transformers import LlamaForCausalLM

    from llmret.llara.modeling import LlaraModel, save_llara

    lm = LlamaForCausalLM(_tiny_llama_model().config)
    save_llara(LlaraModel(lm, head="copy"), tmp_path)
    assert (tmp_path / "projection.safetensors").is_file()
    model = ContrastiveModel.from_pretrained(tmp_path, SPEC, LoraSpec(r=2))
    base = model.encoder.get_base_model()
    assert type(base).__name__ == "LlamaModel"
    torch.testing.assert_close(base.layers[1].mlp.up_proj.base_layer.weight, lm.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(base.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_publish_adapter_replaces_a_previous_one(tmp_path):
    src, dest = tmp_path / "model" / ADAPTER, tmp_path / "a" / "b" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_model.safetensors").write_text("new")
    publish_adapter(src, dest)  # parents created
    assert (dest / "adapter_model.safetensors").read_text() == "new" and not src.exists()
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    publish_adapter(src, dest)  # a rerun: the old adapter goes, nothing of it is left behind
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json"]


# --------------------------------------------------------------------------- SmolLM2: learning and saving


@pytest.fixture(scope="module")
def trained(smollm2_dir, tok):
    """SmolLM2 + LoRA after 8 plain AdamW steps on one batch of 4 queries x 2 passages."""
    torch.manual_seed(0)
    model = ContrastiveModel.from_pretrained(smollm2_dir, SPEC, LoraSpec())
    batch = GroupCollator(tok, SPEC, rng=random.Random(0))(groups_from_records(RECORDS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.slow
def test_loss_goes_down_on_smollm2(trained):
    _, losses = trained
    assert losses[-1] < 0.25 * losses[0], losses  # ~2.4 -> ~0.01 observed


PROBES = ["what do cats eat", "Mount Everest is 8849 metres high.", "a completely unrelated sentence about boats"]


def _embed(model: ContrastiveModel, encoder: TextEncoder, kind: str) -> np.ndarray:
    ids = encoder.tokenize(PROBES, kind)
    vecs = []
    with torch.inference_mode():
        for row in ids:  # one at a time: no padding involved
            t = torch.tensor([row])
            vecs.append(model.encode(t, torch.ones_like(t))[0].numpy())
    return np.stack(vecs)


@pytest.mark.slow
def test_merged_model_encodes_like_adapter_and_trained_model(trained, encoder, smollm2_dir, tok, tmp_path):
    from peft import PeftModel

    model, _ = trained
    in_memory = {k: _embed(model, encoder, k) for k in ("query", "passage")}
    out = tmp_path / "final"
    out.mkdir()
    save_finetuned(model, out)
    tok.save_pretrained(out)
    assert not isinstance(model.encoder, PeftModel)  # merged in place: a plain HF model now

    names = {p.name for p in out.rglob("*")}
    assert {"model.safetensors", "config.json", FINETUNE_JSON, "adapter_model.safetensors"} <= names
    assert (out / ADAPTER / "adapter_config.json").is_file()
    assert not [n for n in names if n.endswith(PICKLES)]
    record = json.loads((out / FINETUNE_JSON).read_text())
    assert record["encoder"] == SPEC.encoder_settings() and record["lora"]["r"] == 8
    assert record["contrastive"]["group_size"] == 2

    merged = TextEncoder(str(out), EncoderSpec(**SPEC.encoder_settings()))
    reloaded = ContrastiveModel(load_adapter_model(smollm2_dir, out / ADAPTER), SPEC, LoraSpec())
    for kind in ("query", "passage"):
        via_encoder = merged.encode(PROBES, kind, show_progress=False)
        via_adapter = _embed(reloaded, encoder, kind)
        base = encoder.encode(PROBES, kind, show_progress=False)
        np.testing.assert_allclose(via_encoder, in_memory[kind], atol=TOL, rtol=0)
        np.testing.assert_allclose(via_adapter, in_memory[kind], atol=TOL, rtol=0)
        np.testing.assert_allclose(_embed(model, encoder, kind), in_memory[kind], atol=TOL, rtol=0)  # merged in place
        assert np.abs(base - in_memory[kind]).max() > 100 * TOL  # training changed the embeddings
    with pytest.raises(TypeError, match="already merged"):
        save_finetuned(model, tmp_path)


# --------------------------------------------------------------------------- the stage, through DeepSpeed


@pytest.mark.slow
def test_finetune_end_to_end_with_deepspeed(tmp_path, smollm2_dir):
    from safetensors import safe_open

    negatives = tmp_path / "negatives.jsonl"
    negatives.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out_dir, adapter_dir = tmp_path / "model", tmp_path / "adapters" / "run"
    training = {
        "max_steps": 2,
        "per_device_batch_size": 2,
        "learning_rate": 1e-3,
        "log_every": 1,
        "save_every": 0,
        "gradient_checkpointing": True,
    }
    result = finetune(
        str(smollm2_dir),
        str(negatives),
        FinetuningSpec(max_query_length=12, max_passage_length=16, group_size=2),
        LoraSpec(r=4),
        training,
        str(out_dir),
        str(adapter_dir),
        str(tmp_path / "ckpt"),
    )
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2] and log[-1]["tokens_per_s"] > 0
    for r in (r for r in log if r["event"] == "step"):  # collapse diagnostics in every step record
        assert -1 <= r["p_cos"] <= 1 and 0 <= r["top1"] <= 1

    names = {p.name for p in out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", FINETUNE_JSON, "training_state.json"} <= names
    assert ADAPTER not in names and not [p for p in out_dir.rglob("*") if p.suffix in PICKLES]
    assert {p.name for p in adapter_dir.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    key = "layers.0.self_attn.q_proj.weight"
    with safe_open(out_dir / "model.safetensors", "pt") as f, safe_open(smollm2_dir / "model.safetensors", "pt") as g:
        assert f.get_tensor(key).shape == g.get_tensor(f"model.{key}").shape
        assert not torch.equal(f.get_tensor(key), g.get_tensor(f"model.{key}"))  # LoRA merged in
        assert torch.equal(f.get_tensor("norm.weight"), g.get_tensor("model.norm.weight"))  # untouched
