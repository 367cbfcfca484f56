"""Post-training quantization of a transformer's Linear layers (int8 and int4 weight-only,
int8-dynamic on CPU, bfloat16), to measure what an encoder loses in quality and gains in
size and speed at lower precision. Works in place.

Design notes (each precision, the weight-only format, tied weights): docs/csplade.md.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmret.specs import settings

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "int8", "int8-dynamic", "int4")
MIN_GROUP_SIZE = 8
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantSpec:
    """The precision an encoder runs at; ``group_size`` is the number of input columns that
    share one scale in the weight-only path (int4 everywhere, int8 off CPU). The output head
    (a causal LM's vocabulary projection, which computes every sparse weight) stays at the
    compute precision unless ``quantize_head`` is set, as transformers' bitsandbytes loading
    keeps it by default."""

    precision: str = "float32"
    group_size: int = 64
    quantize_head: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < MIN_GROUP_SIZE or g & (g - 1):
            raise ValueError(f"group_size must be a power of two >= {MIN_GROUP_SIZE}, got {g!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> QuantSpec:
        return settings(cls, cfg, "quantization settings")

    def to_dict(self) -> dict:
        return asdict(self)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (any integer dtype, in [-8, 7], even-length last axis) two per byte,
    so an int4 weight really occupies half a byte per value."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 values in [-8, 7], last axis twice as long."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 data must be uint8, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.stack((low, high), dim=-1).flatten(-2) - 8


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of a 2-D weight, one float16 scale per
    ``group_size`` consecutive input columns: returns (int8 codes, scales (out, in // g))."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    scales = (w.abs().amax(dim=-1) / qmax).to(SCALE_DTYPE)
    if not torch.isfinite(scales).all():
        raise ValueError("weight has non-finite values or exceeds the float16 scale range")
    s = scales.to(torch.float32)
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    q = torch.round(w / safe).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(out_f, in_f), scales


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as int4 (packed) or int8 codes with group-wise
    float16 scales: the weight shrinks 8x/4x (plus scales) while activations stay in float.
    The weight is dequantized on every forward rather than cached, so memory stays small."""

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64, bias: bool = True
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        if bits == 4:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> WeightOnlyLinear:
        """Quantize a float Linear; the Linear's own parameters are only read, never written
        (a tied weight such as SmolLM2's LM head stays intact in the embedding)."""
        m = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        q, scales = quantize_groups(linear.weight, bits, group_size)
        device = linear.weight.device
        m.qweight = (pack_int4(q) if bits == 4 else q).to(device)
        m.scales = scales.to(device)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        """The integer weight values, (out_features, in_features) int8."""
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the layer computes with: codes * scale in float32, then ``dtype``."""
        q = self.codes().to(torch.float32).reshape(self.out_features, -1, self.group_size)
        w = q * self.scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in the model (recursively, the LM head included)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def output_head_names(model: nn.Module) -> list[str]:
    """The qualified name of the model's output head (``get_output_embeddings()``, e.g. a
    causal LM's ``lm_head``), or nothing for a model without one (a bare encoder)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [name for name, m in model.named_modules() if head is not None and m is head]


def head_precision(model: nn.Module) -> str:
    """The precision the output head computes at ("" for a model without one): what the
    quantization table shows next to the encoder's precision."""
    names = output_head_names(model)
    if not names:
        return ""
    head = model.get_submodule(names[0])
    if isinstance(head, WeightOnlyLinear):
        return f"int{head.bits}"
    if isinstance(head, torch.ao.nn.quantized.dynamic.Linear):
        return "int8-dynamic"
    return str(head.weight.dtype).removeprefix("torch.")


def quantize_weight_only(model: nn.Module, bits: int, group_size: int, keep: Sequence[str] = ()) -> nn.Module:
    """Replace every eligible ``nn.Linear`` but those named in ``keep`` by a
    ``WeightOnlyLinear`` in place; layers whose ``in_features`` is not a multiple of
    ``group_size`` stay float (logged)."""
    done, skipped = 0, []
    for name in linear_names(model):
        if name in keep:
            continue
        linear = model.get_submodule(name)
        if linear.in_features % group_size:
            skipped.append(f"{name} (in_features={linear.in_features})")
            continue
        model.set_submodule(name, WeightOnlyLinear.from_linear(linear, bits, group_size))
        done += 1
    if skipped:
        log.info(
            "int%d: %d Linear layers left in float, in_features not a multiple of group_size %d: %s",
            bits,
            len(skipped),
            group_size,
            ", ".join(skipped),
        )
    log.info("int%d weight-only: quantized %d Linear layers (group_size %d)", bits, done, group_size)
    return model


def quantize_dynamic_int8(model: nn.Module, keep: Sequence[str] = ()) -> nn.Module:
    """torch's CPU dynamic int8 quantization of every ``nn.Linear`` but those named in
    ``keep``, in place; the deprecation warnings of ``torch.ao.quantization`` are silenced
    only here."""
    names = {name for name in linear_names(model) if name not in keep}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


def quantize_model(model: nn.Module, spec: QuantSpec, device: str = "cpu") -> nn.Module:
    """Return ``model`` (float32, eval mode) ready for inference at ``spec.precision`` on
    ``device``; the model is modified in place (docs/csplade.md describes each path)."""
    kind = torch.device(device).type
    model.eval()
    if spec.precision == "float32":
        return model.to(device)
    if spec.precision == "bfloat16":
        return model.to(device=device, dtype=torch.bfloat16)
    keep = [] if spec.quantize_head else output_head_names(model)
    if keep:
        log.info("%s: output head %s kept in float32 (quantize_head: false)", spec.precision, ", ".join(keep))
    if spec.precision == "int8-dynamic":
        if kind != "cpu":
            raise ValueError(f"precision int8-dynamic runs on CPU only (torch's kernels), not {device!r}; use int8")
        return quantize_dynamic_int8(model.to("cpu"), keep)
    bits = 8 if spec.precision == "int8" else 4
    return quantize_weight_only(model, bits, spec.group_size, keep).to(device)


def _dynamic_linear_bytes(m: nn.Module) -> int:
    """Packed int8 weight (1 byte per value) + its scale(s)/zero point(s) at torch's own
    storage types (float64/int64) + bias, of a dynamic-quantized Linear."""
    w, b = m._weight_bias()
    n = w.numel() * w.element_size()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams):
        scales, zeros = w.q_per_channel_scales(), w.q_per_channel_zero_points()
        n += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    else:
        n += 8 + 8  # q_scale() is a double, q_zero_point() an int64
    if b is not None:
        n += b.numel() * b.element_size()
    return n


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy at its current precision (the "model size" of a
    quantization table): every parameter and buffer once, shared tensors (tied embeddings)
    counted once, plus the packed weights torch's dynamic-quantized Linears hide outside
    parameters and buffers."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for _, t in named:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            total += _dynamic_linear_bytes(m)
    return total


def quantization_error(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far quantized outputs drift from the float reference: mean and min row-wise
    cosine similarity and the largest absolute difference. Rows are all axes but the last
    ((batch, seq, vocab) logits are flattened to (batch * seq, vocab)); a zero row against a
    zero row counts as cosine 1."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 0 or a.size == 0:
        raise ValueError(f"need non-empty arrays with at least one axis, got shape {a.shape}")
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.abs(a - b).max()),
    }
