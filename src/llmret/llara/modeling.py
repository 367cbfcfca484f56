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

from llmret.llara.objective import HEAD_MODES, IGNORE, JointBatch, LlaraObjective, encoder_settings
from llmret.retrieval.masks import MASKED_ATTENTION, additive_mask, decoder_of
from llmret.training.checkpointing import save_pretrained


def embeddings_from_hidden(hidden: torch.Tensor, batch: JointBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(EBAE, EBAR) embeddings, each (B, H): final hidden states at the two </s> tokens."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.ebae_index.to(hidden.device)], hidden[rows, batch.ebar_index.to(hidden.device)]


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


def summary_states(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, H): the hidden states at each row's K summary positions ``index`` (B, K)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return hidden[rows, index.to(hidden.device)]


def summary_logits(hidden: torch.Tensor, index: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """(B, V): vocabulary logits of the summary positions, max-pooled over the positions
    (released ``modeling.py``: ``torch.max(logits[:, -8:, :], dim=1)``); only K states per
    row are projected, never the whole sequence."""
    return projection(summary_states(hidden, index)).amax(dim=1)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Next-token cross-entropy, as HF computes it from ``labels=``: position p predicts
    ``labels[p + 1]``, IGNORE labels are skipped, the mean is over the batch's tokens.

    Only the positions that predict a label are projected to the vocabulary.
    """
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE
    if not keep.any():
        return hidden.sum() * 0.0  # keeps the graph alive for backward
    logits = lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, target[keep])


class LlaraModel(nn.Module):
    """A causal LM plus the vocabulary projection of the two bag-of-words heads.

    ``head="copy"``: a fresh ``nn.Linear(hidden, vocab, bias=False)`` starting from the LM
    head weight, trained on its own. ``head="tie"``: the projection *is* the LM head
    (shared parameter; with tied word embeddings, also the input embeddings). Only the
    gathered embeddings (or summary states) are projected, never every position. The
    flagembedding LM term always uses the LM head itself.
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

    def _embeddings(self, hidden: torch.Tensor, batch: JointBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.ebae_summary is None or batch.ebar_summary is None:
            return embeddings_from_hidden(hidden, batch)
        # flagembedding: the mean of the summary states, what the encoder pools at inference.
        return summary_states(hidden, batch.ebae_summary).mean(1), summary_states(hidden, batch.ebar_summary).mean(1)

    def embed(self, batch: JointBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(EBAE, EBAR) embeddings from one joint pass."""
        return self._embeddings(self.hidden(batch), batch)

    def forward(self, batch: JointBatch) -> dict[str, torch.Tensor]:
        """Embeddings always; ``loss``, ``loss_ebae``, ``loss_ebar`` (and ``loss_lm`` for
        flagembedding) when the batch has targets.

        loss = ebae_weight * loss_ebae + ebar_weight * loss_ebar [+ lm_weight * loss_lm]
        (paper: both weights 1; release: 0.05, 0.05, 1).
        """
        obj = self.objective
        if obj.flag != (batch.ebae_summary is not None):
            raise ValueError(f"the batch was not built for the {obj.variant!r} variant")
        hidden = self.hidden(batch)
        ebae, ebar = self._embeddings(hidden, batch)
        out = {"ebae_emb": ebae, "ebar_emb": ebar}
        if batch.ebae_targets is None or batch.ebar_targets is None:
            return out
        dev = ebae.device
        if obj.flag:
            logits_ae = summary_logits(hidden, batch.ebae_summary, self.projection)
            logits_ar = summary_logits(hidden, batch.ebar_summary, self.projection)
        else:
            logits_ae, logits_ar = self.projection(ebae), self.projection(ebar)
        out["loss_ebae"] = bow_loss(logits_ae, batch.ebae_targets.to(dev))
        out["loss_ebar"] = bow_loss(logits_ar, batch.ebar_targets.to(dev))
        out["loss"] = obj.ebae_weight * out["loss_ebae"] + obj.ebar_weight * out["loss_ebar"]
        if obj.flag:
            out["loss_lm"] = lm_loss(hidden, batch.lm_labels, self.lm.get_output_embeddings())
            out["loss"] = out["loss"] + obj.lm_weight * out["loss_lm"]
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
