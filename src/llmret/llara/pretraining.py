"""LLaRA pretraining as two workflow stages: token shards, then the DeepSpeed run.

The stages meet in files only (shards + manifest in, an HF checkpoint in safetensors out),
so each can be cached, rerun alone or sent to a different machine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmret import schema
from llmret.llara.objective import LlaraObjective, add_summary_tokens
from llmret.llara.variants import variant_class
from llmret.specs import in_order, own_settings, settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
@schema.defaults_from("pretraining")
class PretrainSpec:
    """What the shards and the objective are made of (the ``pretraining.{run}`` config).

    ``variant`` picks the paper's objective or the released FlagEmbedding one
    (:class:`llmret.llara.objective.LlaraObjective`, :mod:`llmret.llara.variants`); settings
    left at None take the variant's value, ``head`` included: ``copy`` for the paper, ``tie``
    for flagembedding (the release projects with the LM head itself).
    """

    shards: int
    seed: int
    max_text_length: int
    min_words: int
    ebae_prompt: str | None
    ebar_prompt: str | None
    head: str | None
    variant: str
    text_prefix: str | None
    summary_tokens: int
    lm_weight: float | None
    ebae_weight: float | None
    ebar_weight: float | None

    def __post_init__(self) -> None:
        if self.head is None:
            object.__setattr__(self, "head", variant_class(self.variant).default_head)
        schema.check_bounds(self, "pretraining")
        self.objective()  # a bad variant, prompt or weight fails here, not in a training job

    @classmethod
    def from_config(cls, cfg: Mapping) -> PretrainSpec:
        return settings(cls, cfg, "pretraining settings")

    def rerun_keys(self) -> dict:
        """The run's rerun keys (:func:`llmret.specs.rerun_keys` builds the
        spec from the config entry and orders them): the settings with every None resolved,
        what the run really does, so writing a default out (or leaving it null) never retrains.
        The variant adds the objective's other settings
        (:meth:`llmret.llara.variants.LlaraVariant.rerun_settings`): the paper variant none
        while they are its defaults, as before variants existed, so its cached shards and
        checkpoints stay valid."""
        obj = self.objective()
        return {
            "shards": self.shards,
            "seed": self.seed,
            "max_text_length": self.max_text_length,
            "min_words": self.min_words,
            "ebae_prompt": obj.ebae_prompt,
            "ebar_prompt": obj.ebar_prompt,
            "head": self.head,
            **obj.kind.rerun_settings(obj),
        }

    def effective(self, order: Sequence[str] = ()) -> dict:
        """:meth:`rerun_keys`, the keys named in ``order`` (the config entry's) first: the
        workflow's ``params`` (what ``llmret.plan.rerun_settings`` calls)."""
        return in_order(self.rerun_keys(), order)

    def objective(self) -> LlaraObjective:
        return LlaraObjective(
            ebae_prompt=self.ebae_prompt,
            ebar_prompt=self.ebar_prompt,
            max_text_length=self.max_text_length,
            ebae_weight=self.ebae_weight,
            ebar_weight=self.ebar_weight,
            variant=self.variant,
            text_prefix=self.text_prefix,
            lm_weight=self.lm_weight,
            summary_tokens=self.summary_tokens,
        )


def required_encoder_settings(pretrain_entry: Mapping) -> dict[str, str | bool]:
    """The encoder settings (key -> value) that a dense system on the model of the
    ``pretraining.{run}`` config entry ``pretrain_entry`` must have: the run's variant decides
    (flagembedding: its templates, ``append_eos`` and ``pooling``; the paper's: none, ``{}``).
    The entry's other keys (model, corpora, training, ...) are ignored; a bad setting raises
    ValueError as :class:`PretrainSpec` does."""
    objective = PretrainSpec.from_config(own_settings(PretrainSpec, pretrain_entry)).objective()
    return objective.kind.required_encoder_settings(objective)


def make_shard(
    corpus_paths: Sequence[str],
    model_dir: str,
    shard: int,
    spec: PretrainSpec,
    out_path: str,
    dpr_paths: Sequence[str] = (),
) -> dict:
    """Tokenize this shard's share of the (text, next text) pairs of the BEIR corpora and of
    DPR's Wikipedia passages (``dpr_paths``: the whole file or a streamed prefix)."""
    from itertools import chain

    from transformers import AutoTokenizer

    from llmret.llara.pairs import pairs_from_beir, pairs_from_dpr_wiki
    from llmret.llara.pretrain_shards import tokenize_shard

    if not corpus_paths and not dpr_paths:
        raise ValueError("no pretraining source: give corpora, DPR Wikipedia, or both")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    add_summary_tokens(tokenizer, spec.objective())  # the vocabulary training will use, in the fingerprint
    sources = [pairs_from_beir(corpus_paths, min_words=spec.min_words)] if corpus_paths else []
    sources += [pairs_from_dpr_wiki(p) for p in dpr_paths]
    stats = tokenize_shard(
        chain.from_iterable(sources),
        shard=shard,
        num_shards=spec.shards,
        seed=spec.seed,
        tokenizer=tokenizer,
        max_text_length=spec.max_text_length,
        out_path=out_path,
    )
    log.info("shard %d/%d: %s", shard, spec.shards, stats)
    return stats


def pretrain(
    model_dir: str, manifest: str, spec: PretrainSpec | Mapping, training: Mapping, out_dir: str, checkpoint_dir: str
) -> dict:
    """Train LLaRA from ``model_dir`` on the manifest's shards; resumes from ``checkpoint_dir``."""
    if not isinstance(spec, PretrainSpec):  # a config mapping (llmret.launch passes JSON)
        spec = PretrainSpec.from_config(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmret.llara.modeling import LlaraModel, save_llara
    from llmret.llara.objective import PAD, fit_embeddings
    from llmret.llara.shard_dataset import ShardDataset, collate
    from llmret.training.arguments import TrainingArgs
    from llmret.training.loop import train

    args = settings(TrainingArgs, {**training, "output_dir": out_dir, "checkpoint_dir": checkpoint_dir}, "training")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Created in the run's dtype (training.dtype, agreeing with the DeepSpeed config): a 7B
    # model never exists as a float32 copy that DeepSpeed would cast afterwards.
    dtype = args.torch_dtype
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    objective = spec.objective()
    # flagembedding: the summary tokens join the vocabulary (as in make_shard) and the
    # embeddings grow to hold them; the tokenizer is saved with the checkpoint by train().
    add_summary_tokens(tokenizer, objective)
    fit_embeddings(lm, tokenizer)
    dataset = ShardDataset.from_manifest(manifest)
    dataset.check_compatible(tokenizer, objective)
    model = LlaraModel(lm, objective, head=spec.head)
    return train(
        model,
        dataset,
        collate(tokenizer, objective, lm.config.vocab_size, dtype),
        args,
        tokenizer=tokenizer,
        save_fn=save_llara,
        # Segments, not the pad id, tell padding apart: SmolLM2 pads with its EOS token.
        count_tokens=lambda batch: int((batch.segments != PAD).sum()),
        # The manifest holds every shard's sha256.
        inputs=(model_dir, manifest),
    )
