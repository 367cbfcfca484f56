"""RepLLaMA-style contrastive fine-tuning: LoRA on a causal LM, InfoNCE over hard-negative groups.

Recipe (Ma et al., "Fine-Tuning LLaMA for Multi-Stage Text Retrieval", as in Tevatron): each
query comes with a group of ``group_size`` passages, one positive and ``group_size - 1`` mined
hard negatives. Queries and passages are framed by prompt templates, closed by an EOS token and
embedded as the (L2-normalised) last hidden state at that token. The loss is a softmax
cross-entropy over query-passage dot products divided by a temperature, where every passage of
the global batch (all ranks) is a candidate for every query (in-batch negatives).

Only LoRA adapters are trained (peft, ``FEATURE_EXTRACTION`` task: an ``AutoModel`` without LM
head). The base is a plain HF causal-LM checkpoint or a LLaRA checkpoint
(:func:`llmret.training.save_llara`: ``AutoModel`` reads its LM and ignores the extra files).

Outputs of :func:`finetune`
    ``out_dir``: the LoRA-merged model (``save_pretrained``, safetensors; an ``AutoModel``, so
    without LM head), the tokenizer, ``finetune.json`` (both specs and the encoder settings a
    dense system must use) and ``training_state.json``. ``adapter_dir``: the PEFT adapter alone
    (``adapter_model.safetensors`` + ``adapter_config.json``), to reload on the base with
    :func:`load_adapter_model`.

Tokenisation goes through :func:`llmret.encoding.tokenize_kind`, the function the dense encoder
uses at inference, so training and retrieval see identical ids for the settings returned by
:meth:`ContrastiveSpec.encoder_settings`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .beir import join_title
from .config import settings
from .encoding import EncoderSpec, pad_id_of, special_frame, tokenize_kind
from .pooling import pool

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "adapter"  # subfolder of the final model folder holding the adapter until finetune() moves it
FINETUNE_JSON = "finetune.json"
BATCH_KEYS = ("query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoraSpec:
    """Which linear layers get adapters and how large they are (the ``lora`` config section)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # YAML gives lists
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lora target_modules must be non-empty module names, got {self.target_modules!r}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"lora target_modules has duplicates: {self.target_modules!r}")

    @classmethod
    def from_config(cls, cfg: Mapping) -> LoraSpec:
        return settings(cls, cfg, "LoRA settings")

    def peft_config(self):
        """The peft ``LoraConfig`` (feature extraction: the wrapped model has no LM head)."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


@dataclass(frozen=True)
class ContrastiveSpec:
    """How texts are framed and pooled, and what the contrastive loss compares."""

    query_template: str = "query: {text}"
    passage_template: str = "passage: {text}"
    append_eos: bool = True
    pooling: str = "last"
    normalize: bool = True
    max_query_length: int = 32
    max_passage_length: int = 128
    group_size: int = 8  # passages per query: 1 positive + group_size-1 hard negatives
    temperature: float = 0.01
    in_batch_negatives: bool = True  # every passage of the (global) batch is a candidate for every query

    def __post_init__(self) -> None:
        EncoderSpec(**self.encoder_settings())  # checks templates and pooling as the encoder will
        for name in ("max_query_length", "max_passage_length", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.group_size < 2 and not self.in_batch_negatives:
            raise ValueError("group_size 1 without in-batch negatives leaves no negative: the loss would be 0")

    @classmethod
    def from_config(cls, cfg: Mapping) -> ContrastiveSpec:
        return settings(cls, cfg, "fine-tuning settings")

    def encoder_settings(self) -> dict:
        """The :class:`llmret.encoding.EncoderSpec` fields a dense system must use to encode with
        the fine-tuned model (the rest, batch size and dtype, are the system's choice)."""
        return {
            "pooling": self.pooling,
            "query_template": self.query_template,
            "passage_template": self.passage_template,
            "append_eos": self.append_eos,
            "normalize": self.normalize,
            "max_query_length": self.max_query_length,
            "max_passage_length": self.max_passage_length,
        }


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainGroup:
    """One training query with its passage texts (title joined to text as BEIR baselines do)."""

    query_id: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]


def _passage_text(p: Mapping) -> str:
    return join_title(p.get("title") or "", p["text"])


def groups_from_records(records: Iterable[Mapping]) -> list[TrainGroup]:
    """Tevatron records (``query_id``, ``query``, ``positive_passages``, ``negative_passages``)
    to :class:`TrainGroup`s; the map-style dataset of :func:`finetune` is this list."""
    out = []
    for rec in records:
        group = TrainGroup(
            query_id=str(rec["query_id"]),
            query=rec["query"],
            positives=tuple(_passage_text(p) for p in rec["positive_passages"]),
            negatives=tuple(_passage_text(p) for p in rec.get("negative_passages") or ()),
        )
        if not group.positives:
            raise ValueError(f"query {group.query_id!r} has no positive passage")
        out.append(group)
    if not out:
        raise ValueError("no training queries")
    return out


def check_negatives(groups: Sequence[TrainGroup], group_size: int) -> None:
    """Fail before training, not at some later step, if a query cannot fill its group."""
    if group_size < 2:
        return
    empty = [g.query_id for g in groups if not g.negatives]
    if empty:
        raise ValueError(f"{len(empty)} queries have no negative passage for group_size={group_size}: {empty[:5]}")


def sample_group(group: TrainGroup, group_size: int, rng: Any = random) -> list[str]:
    """Positive first, then ``group_size - 1`` negatives: without replacement when the query has
    enough, with replacement only when it has fewer (as Tevatron does). ``rng`` is anything with
    ``choice``/``sample``/``choices`` (default: the ``random`` module)."""
    k = group_size - 1
    negatives = list(group.negatives)
    if k == 0:
        chosen: list[str] = []
    elif len(negatives) >= k:
        chosen = rng.sample(negatives, k)
    elif negatives:
        chosen = rng.choices(negatives, k=k)
    else:
        raise ValueError(f"query {group.query_id!r} has no negative passage for group_size={group_size}")
    return [rng.choice(group.positives), *chosen]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask)``, both long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class GroupCollator:
    """Batch of :class:`TrainGroup`s -> the tensors of :meth:`ContrastiveModel.forward`.

    Passages are laid out query-major: rows ``i*G .. i*G+G-1`` are query i's group, positive
    first. Sampling uses Python's ``random`` module unless an ``rng`` is given: :func:`train`
    reseeds it from (seed, step, rank) at every optimizer step and, with ``num_workers=0``,
    collates inside that step, so the sampled groups are deterministic and replay identically
    after a resume (worker processes would have their own ``random`` state).
    """

    def __init__(self, tokenizer, spec: ContrastiveSpec, rng: random.Random | None = None):
        self.tokenizer, self.spec, self.rng = tokenizer, spec, rng
        self.head, self.tail = special_frame(tokenizer)
        self.pad_id = pad_id_of(tokenizer)  # as TextEncoder pads

    def tokenize(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        return tokenize_kind(self.tokenizer, self.spec, texts, kind, self.head, self.tail)

    def sample_texts(self, groups: Sequence[TrainGroup]) -> tuple[list[str], list[str]]:
        """(query texts, passage texts query-major with each group's positive first)."""
        rng = self.rng if self.rng is not None else random
        passages = [text for g in groups for text in sample_group(g, self.spec.group_size, rng)]
        return [g.query for g in groups], passages

    def __call__(self, groups: Sequence[TrainGroup]) -> dict[str, torch.Tensor]:
        queries, passages = self.sample_texts(groups)
        q_ids, q_mask = pad_rows(self.tokenize(queries, "query"), self.pad_id)
        p_ids, p_mask = pad_rows(self.tokenize(passages, "passage"), self.pad_id)
        return dict(zip(BATCH_KEYS, (q_ids, q_mask, p_ids, p_mask), strict=True))


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Non-pad tokens of queries and passages (masks, since the pad id may be the EOS id)."""
    return int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum())


# --------------------------------------------------------------------------- loss


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float,
    group_size: int,
    in_batch: bool = True,
    offset: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of each query's positive among its candidates.

    ``q`` (n, d) are queries ``offset .. offset+n-1`` of the global batch, ``p`` (N*G, d) its
    passages, query-major with the positive first, so query i's positive is row
    ``(offset + i) * group_size``. With ``in_batch`` every row of ``p`` is a candidate
    (``q @ p.T / temperature``); without, each query scores its own group only.
    """
    n = q.shape[0]
    if p.shape[0] % group_size or p.shape[0] < (offset + n) * group_size:
        raise ValueError(f"{p.shape[0]} passages do not hold groups of {group_size} for queries {offset}..{offset + n}")
    q, p = q.float(), p.float()
    if in_batch:
        scores = q @ p.T / temperature
        target = (offset + torch.arange(n, device=q.device)) * group_size
    else:
        own = p[offset * group_size : (offset + n) * group_size].view(n, group_size, -1)
        scores = torch.einsum("nd,ngd->ng", q, own) / temperature
        target = torch.zeros(n, dtype=torch.long, device=q.device)
    return F.cross_entropy(scores, target)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine between distinct rows of ``x`` (n >= 2). Near 1 when the embeddings have
    collapsed onto one direction: at temperature 0.01 InfoNCE can fall from a confidently
    wrong start to ln(candidates) that way, a loss that alone looks like learning."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two rows")
    x = F.normalize(x.detach().float(), dim=-1)
    total = (x.sum(0) ** 2).sum() - (x * x).sum()  # sum over i != j of x_i . x_j
    return float(total / (n * (n - 1)))


def top1_accuracy(q: torch.Tensor, p: torch.Tensor, group_size: int) -> float:
    """Fraction of the local queries whose positive (row ``i * group_size`` of the local
    passages) outscores every local passage: the in-batch retrieval the loss trains."""
    scores = q.detach().float() @ p.detach().float().T
    target = torch.arange(q.shape[0], device=q.device) * group_size
    return float((scores.argmax(1) == target).float().mean())


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of ``x`` from all ranks, concatenated in rank order; this rank's first row).

    The gather keeps the autograd graph (``torch.distributed.nn.functional.all_gather``): its
    backward sums, into each rank's own rows, the gradients every rank's loss sends them, so
    after DeepSpeed averages gradients over ranks they are those of the global mean loss.
    A single process (or no process group) gets ``x`` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in torch 2.13 in favour of a private module
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    rank = dist.get_rank()
    return torch.cat(parts), sum(t.shape[0] for t in parts[:rank])


# --------------------------------------------------------------------------- model


def apply_lora(model: nn.Module, lora: LoraSpec, seed: int = 0):
    """``get_peft_model`` after checking that every named target exists (peft only fails when
    none does; a typo in one name would otherwise train fewer layers than asked).

    The random LoRA ``A`` matrices are drawn from a generator seeded with ``seed`` (the
    training seed), not from whatever state the process's global RNG is in: ``B`` starts at
    zero, so an unseeded ``A`` leaves the first step's loss identical and makes every later
    step differ from run to run."""
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in present]
    if missing:
        raise ValueError(f"LoRA target modules not in {type(model).__name__}: {missing}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora.peft_config())


def training_seed(training: Mapping) -> int:
    """The ``seed`` of a training mapping (TrainingArgs' default when unset)."""
    from .training import TrainingArgs

    return int(training.get("seed", TrainingArgs.seed))


class ContrastiveModel(nn.Module):
    """A PEFT-wrapped ``AutoModel`` that embeds queries and passages and returns the InfoNCE loss.

    :func:`llmret.training.train` enables gradient checkpointing on the first submodule that
    offers it: the PEFT wrapper forwards the call to the HF model (non-reentrant checkpointing;
    HF also makes the frozen embeddings' output require grad, so LoRA layers get gradients).
    """

    def __init__(self, encoder: nn.Module, spec: ContrastiveSpec, lora: LoraSpec):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.lora = lora  # recorded in finetune.json by save_finetuned

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        spec: ContrastiveSpec,
        lora: LoraSpec,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> ContrastiveModel:
        from transformers import AutoModel

        base = AutoModel.from_pretrained(model_dir, dtype=dtype)
        return cls(apply_lora(base, lora, seed), spec, lora)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings as :meth:`llmret.encoding.TextEncoder.embed_ids` computes them."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        vec = pool(self.spec.pooling, out.last_hidden_state, attention_mask).float()
        return F.normalize(vec, dim=-1) if self.spec.normalize else vec

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        passage_input_ids: torch.Tensor,
        passage_attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        q = self.encode(query_input_ids, query_attention_mask)
        p = self.encode(passage_input_ids, passage_attention_mask)
        need = q.shape[0] * self.spec.group_size
        if p.shape[0] != need:
            raise ValueError(f"{q.shape[0]} queries need {need} passages, got {p.shape[0]}")
        # Logged per step: the passages' mean pairwise cosine (-> 1 on collapse) and in-batch top-1.
        log = {"top1": top1_accuracy(q, p, self.spec.group_size)}
        if p.shape[0] > 1:
            log["p_cos"] = mean_pairwise_cosine(p)
        offset = 0
        if self.spec.in_batch_negatives:  # without them a query's candidates are all local
            p, first_row = gather_with_grad(p)
            offset = first_row // self.spec.group_size
        loss = info_nce(q, p, self.spec.temperature, self.spec.group_size, self.spec.in_batch_negatives, offset)
        return {"loss": loss, "log": log}


# --------------------------------------------------------------------------- save / load


def save_finetuned(model: ContrastiveModel, out_dir: Path) -> None:
    """``save_fn`` for :func:`llmret.training.train`: the adapter to ``out_dir/adapter``, then the
    LoRA-merged model to ``out_dir`` and ``finetune.json``. Merging rewrites the base weights in
    place and ``model.encoder`` becomes the plain merged model: call it only once training is over."""
    record = {"contrastive": asdict(model.spec), "lora": asdict(model.lora), "encoder": model.spec.encoder_settings()}
    save_merged_lora(model, Path(out_dir), FINETUNE_JSON, record)


def save_merged_lora(model: nn.Module, out_dir: Path, record_name: str, record: Mapping) -> None:
    """Save ``model.encoder`` (a PEFT model): its adapter to ``out_dir/adapter``, the merged
    model to ``out_dir`` (safetensors) and ``record`` as ``out_dir/record_name``. Merges in
    place: afterwards ``model.encoder`` is the plain merged model. Shared by every LoRA stage."""
    from peft import PeftModel

    from .training import _save_pretrained

    if not isinstance(model.encoder, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(model.encoder).__name__} (already merged?)")
    out_dir = Path(out_dir)
    _save_pretrained(model.encoder, out_dir / ADAPTER)
    merged = model.encoder.merge_and_unload()
    model.encoder = merged
    _save_pretrained(merged, out_dir)
    (out_dir / record_name).write_text(json.dumps(record, indent=2))


def load_adapter_model(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``AutoModel`` from ``base_dir`` with the adapter of ``adapter_dir`` applied (not merged), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# --------------------------------------------------------------------------- workflow stage


def load_groups(path: str | os.PathLike) -> list[TrainGroup]:
    """The Tevatron JSONL file of mined negatives as :class:`TrainGroup`s."""
    from .mining import read_tevatron  # validates the file (file:line errors)

    return groups_from_records(read_tevatron(path))


def finetune(
    model_dir: str,
    negatives_path: str,
    spec: ContrastiveSpec | Mapping,
    lora: LoraSpec | Mapping,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
) -> dict:
    """LoRA contrastive fine-tuning of ``model_dir``; resumes from ``checkpoint_dir``.

    Writes the merged model to ``out_dir`` and moves the adapter to ``adapter_dir`` (two
    declared outputs). Returns :func:`llmret.training.train`'s result. ``spec`` and ``lora``
    may be config mappings (as :mod:`llmret.launch` passes them).
    """
    from transformers import AutoTokenizer

    if not isinstance(spec, ContrastiveSpec):
        spec = ContrastiveSpec.from_config(spec)
    if not isinstance(lora, LoraSpec):
        lora = LoraSpec.from_config(lora)
    groups = load_groups(negatives_path)
    check_negatives(groups, spec.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ContrastiveModel.from_pretrained(model_dir, spec, lora, seed=training_seed(training))
    log.info("fine-tuning %s on %d queries from %s", model_dir, len(groups), negatives_path)
    return train_lora_stage(
        model,
        groups,
        GroupCollator(tokenizer, spec),
        training,
        out_dir,
        adapter_dir,
        checkpoint_dir,
        tokenizer=tokenizer,
        save_fn=save_finetuned,
        count_tokens=count_tokens,
        inputs=(model_dir, negatives_path),
    )


def train_lora_stage(
    model: nn.Module,
    dataset: Sequence,
    collator: Any,
    training: Mapping,
    out_dir: str,
    adapter_dir: str,
    checkpoint_dir: str,
    tokenizer: Any,
    save_fn: Any,
    count_tokens: Any,
    inputs: Sequence = (),
) -> dict:
    """:func:`llmret.training.train` for a LoRA stage whose ``save_fn`` leaves the adapter in
    ``out_dir/adapter``; rank 0 then moves it to ``adapter_dir``. ``training`` is the config
    mapping of :class:`llmret.training.TrainingArgs` without the two folders; ``inputs``
    (base model, data) join the checkpoint recipe."""
    import torch.distributed as dist

    from .training import TrainingArgs, train

    args = settings(TrainingArgs, {**training, "output_dir": out_dir, "checkpoint_dir": checkpoint_dir}, "training")
    result = train(
        model, dataset, collator, args, tokenizer=tokenizer, save_fn=save_fn, count_tokens=count_tokens, inputs=inputs
    )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        publish_adapter(Path(out_dir) / ADAPTER, Path(adapter_dir))
    return result


def publish_adapter(src: Path, dest: Path) -> None:
    """Move the adapter out of the model folder (``os.replace``; a previous ``dest`` is removed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)
