"""LLaRA's model: a causal LM plus the vocabulary projection of the two bag-of-words heads
(copied from or tied to the LM head), the EBAE/EBAR and next-token losses on the joint
pass, and ``save_llara`` for the final checkpoint and ``llara.json``.

Design notes: docs/llara.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmret.llara.objective import HEAD_MODES, JointBatch, LlaraObjective, encoder_settings

# The variants' pooling and loss pieces, re-exported where they were defined before variants were classes.
from llmret.llara.variants import embeddings_from_hidden as embeddings_from_hidden
from llmret.llara.variants import lm_loss as lm_loss
from llmret.llara.variants import summary_logits as summary_logits
from llmret.llara.variants import summary_states as summary_states
from llmret.retrieval.masks import MASKED_ATTENTION, additive_mask, decoder_of
from llmret.training.checkpointing import save_pretrained


def bow_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Paper eq. 6 for one task, averaged so that text length does not weight examples.

    For example i with token set T_i (targets[i] multi-hot, or any non-negative weights):
        loss_i = -sum_t targets[i, t] * log_softmax(logits[i])[t] / sum_t targets[i, t]
    i.e. the mean of -log p(t | e_i) over the distinct target tokens; the result is the
    mean of loss_i over examples whose target is non-empty (0 if none is).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    targets = targets.to(logp)
    size = targets.sum(-1)
    has = size > 0
    if not has.any():
        return logp.sum() * 0.0  # keeps the graph alive for backward
    per = -(targets * logp).sum(-1)[has] / size[has]
    return per.mean()


class LlaraModel(nn.Module):
    """A causal LM plus the vocabulary projection of the two bag-of-words heads.

    ``head="copy"``: a fresh ``nn.Linear(hidden, vocab, bias=False)`` starting from the LM
    head weight, trained on its own. ``head="tie"``: the projection *is* the LM head
    (shared parameter; with tied word embeddings, also the input embeddings). Only the
    gathered embeddings (or summary states) are projected, never every position. The
    objective's variant (``objective.kind``) pools the embeddings, makes the BoW logits and
    adds its own terms (flagembedding: the LM term, always with the LM head itself).
    """

    def __init__(self, lm: nn.Module, objective: LlaraObjective = LlaraObjective(), head: str = "copy"):
        super().__init__()
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
        self.lm = lm
        self.objective = objective
        lm_head = lm.get_output_embeddings()
        if lm_head is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings to start the projection from")
        vocab, hidden = lm_head.weight.shape
        self.projection = nn.Linear(hidden, vocab, bias=False, device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        with torch.no_grad():
            self.projection.weight.copy_(lm_head.weight)
        if head == "tie":
            self.projection.weight = lm_head.weight
        self.head = head

    @property
    def decoder(self) -> nn.Module:
        return decoder_of(self.lm)

    def hidden(self, batch: JointBatch) -> torch.Tensor:
        """(B, L, H) final hidden states of one joint pass under the 4-D mask."""
        body = self.decoder
        impl = getattr(body.config, "_attn_implementation", None)
        if impl not in MASKED_ATTENTION:
            # flash-attention kernels take no arbitrary 4-D mask: SELF would leak into NEXT.
            raise ValueError(f"attn_implementation must be one of {MASKED_ATTENTION} for the joint mask, got {impl!r}")
        param = next(body.parameters())
        mask = batch.attention_mask.to(param.device)
        if mask.dtype != param.dtype:  # SDPA requires the query dtype; re-derive min for it
            mask = additive_mask(mask[:, 0] == 0, param.dtype)
        out = body(
            input_ids=batch.input_ids.to(param.device),
            attention_mask=mask,
            position_ids=batch.position_ids.to(param.device),
            use_cache=False,
        )
        return out.last_hidden_state

    def embed(self, batch: JointBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(EBAE, EBAR) embeddings from one joint pass."""
        kind = self.objective.kind
        kind.check_batch(batch)
        return kind.embeddings(self.hidden(batch), batch)

    def forward(self, batch: JointBatch) -> dict[str, torch.Tensor]:
        """Embeddings always; ``loss``, ``loss_ebae``, ``loss_ebar`` (and ``loss_lm`` for
        flagembedding) when the batch has targets.

        loss = ebae_weight * loss_ebae + ebar_weight * loss_ebar [+ lm_weight * loss_lm]
        (paper: both weights 1; release: 0.05, 0.05, 1).
        """
        obj = self.objective
        kind = obj.kind
        kind.check_batch(batch)
        hidden = self.hidden(batch)
        ebae, ebar = kind.embeddings(hidden, batch)
        out = {"ebae_emb": ebae, "ebar_emb": ebar}
        if batch.ebae_targets is None or batch.ebar_targets is None:
            return out
        dev = ebae.device
        logits_ae, logits_ar = kind.bow_logits(hidden, batch, (ebae, ebar), self.projection)
        out["loss_ebae"] = bow_loss(logits_ae, batch.ebae_targets.to(dev))
        out["loss_ebar"] = bow_loss(logits_ar, batch.ebar_targets.to(dev))
        out["loss"] = obj.ebae_weight * out["loss_ebae"] + obj.ebar_weight * out["loss_ebar"]
        for name, (weight, value) in kind.extra_losses(obj, hidden, batch, self.lm).items():
            out[name] = value
            out["loss"] = out["loss"] + weight * value
        return out


def save_llara(model: nn.Module, out_dir: Path) -> None:
    """``save_fn`` for :class:`llmret.llara.modeling.LlaraModel`: the LM (or its PEFT adapter) with
    ``save_pretrained``, the separate projection head as ``projection.safetensors`` (only for
    ``head="copy"``; with ``"tie"`` it is the LM head already saved) and ``llara.json``, which
    also names the dense-system settings that encode as the objective trained."""
    from safetensors.torch import save_file

    save_pretrained(model.lm, out_dir)
    if model.head == "copy":
        save_file(
            {"weight": model.projection.weight.detach().cpu().contiguous()}, str(out_dir / "projection.safetensors")
        )
    (out_dir / "llara.json").write_text(
        json.dumps(
            {
                "head": model.head,
                "objective": asdict(model.objective),
                "encoder": encoder_settings(model.objective),
            },
            indent=2,
        )
    )
