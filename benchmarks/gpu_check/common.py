"""What every part of the GPU check shares: the sizes (full and ``--tiny``), the context a part
runs in, the synthetic tokenizer and texts, random Llama checkpoints, result files and
process trees. Imports nothing heavy at module level (the driver never loads torch)."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DEEPSPEED_GPU = ROOT / "config" / "deepspeed" / "gpu_zero2_bf16.json"
DEEPSPEED_CPU = ROOT / "config" / "deepspeed" / "cpu.json"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3: unk, bos, eos, pad
SEED = 42


@dataclass(frozen=True)
class Sizes:
    """Every size the parts use. The dense model is Llama-2-7B's width (LLaRA, LoRA,
    encoding); the sparse one Llama-3's (CSPLADE)."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int  # the synthetic tokenizer's (and the dense model's) vocabulary
    llara_layers: tuple[int, ...]
    llara_batch: int
    llara_row: int  # tokens of a joint LLaRA row: text + both prompt segments
    llara_steps: int  # timing runs
    lora_batch: int  # queries per step
    lora_group: int
    lora_query: int
    lora_passage: int
    lora_r: int
    sp_hidden: int
    sp_intermediate: int
    sp_heads: int
    sp_kv_heads: int
    sp_vocab: int
    sp_queries: int
    sp_group: int  # passages per query
    sp_query: int
    sp_passage: int
    encode_texts: int
    encode_words: tuple[int, int]
    encode_batch_tokens: int
    vectors: int
    queries: int
    subset_vectors: int  # FAISS on the CPU: timed on this many vectors and scaled up
    subset_queries: int
    k: int


FULL = Sizes(
    hidden=4096,
    intermediate=11008,
    heads=32,
    vocab=32000,
    llara_layers=(2, 4),
    llara_batch=32,
    llara_row=170,
    llara_steps=6,
    lora_batch=16,
    lora_group=16,
    lora_query=32,
    lora_passage=156,
    lora_r=32,
    sp_hidden=4096,
    sp_intermediate=14336,
    sp_heads=32,
    sp_kv_heads=8,
    sp_vocab=128256,
    sp_queries=16,
    sp_group=8,
    sp_query=32,
    sp_passage=256,
    encode_texts=20000,
    encode_words=(48, 250),
    encode_batch_tokens=65536,
    vectors=500_000,
    queries=20_000,
    subset_vectors=50_000,
    subset_queries=2_000,
    k=100,
)

TINY = Sizes(
    hidden=64,
    intermediate=128,
    heads=4,
    vocab=512,
    llara_layers=(2, 4),
    llara_batch=4,
    llara_row=32,
    llara_steps=4,
    lora_batch=2,
    lora_group=4,
    lora_query=16,
    lora_passage=32,
    lora_r=4,
    sp_hidden=64,
    sp_intermediate=128,
    sp_heads=4,
    sp_kv_heads=2,
    sp_vocab=512,  # the tokenizer's
    sp_queries=4,
    sp_group=2,
    sp_query=16,
    sp_passage=32,
    encode_texts=200,
    encode_words=(8, 30),
    encode_batch_tokens=1024,
    vectors=2000,
    queries=200,
    subset_vectors=2000,
    subset_queries=200,
    k=10,
)


@dataclass(frozen=True)
class Context:
    """Where a part runs: its work folder, ``cuda`` or ``cpu``, and the sizes."""

    work: Path
    device: str
    tiny: bool

    @property
    def sizes(self) -> Sizes:
        return TINY if self.tiny else FULL

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def deepspeed_config(self) -> Path:
        return DEEPSPEED_GPU if self.gpu else DEEPSPEED_CPU

    @property
    def dtype_name(self) -> str:
        """The training and encoding dtype: bf16 on a GPU, float32 on the CPU (cpu.json)."""
        return "bfloat16" if self.gpu else "float32"

    def inputs(self) -> dict:
        """What the prepare part made (paths and settings), or an error."""
        data = read_json(self.work / "inputs.json")
        if data is None:
            raise RuntimeError(f"no {self.work / 'inputs.json'}: the prepare part did not finish")
        return data

    def result(self, part: str) -> dict | None:
        return read_json(self.work / "results" / f"{part}.json")


# --------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def row(check: str, ok: bool, figures: str, /, **data: Any) -> dict:
    """One line of the table: what was checked, ok or not, the figures as text, the numbers."""
    return {"check": check, "status": "ok" if ok else "failed", "figures": figures, "data": data}


def error_line(log_path: Path, limit: int = 300) -> str:
    """The most telling line of a failed process's log: the last one naming an error."""
    try:
        lines = [x.strip() for x in Path(log_path).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return f"(no log at {log_path})"
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[-limit:]
    return lines[-1][-limit:] if lines else "(empty log)"


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every descendant, collected before any dies (torchrun starts
    its ranks in sessions of their own, so a process group would miss them). Returns the pids."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- synthetic data


def vocabulary(size: int) -> list[str]:
    """The synthetic tokenizer's words: the specials, every word of the prompts and templates
    the parts use (LLaRA's paper prompts, ``query:``/``passage:``), then fillers ``w0, w1, ...``."""
    from tokenizers import pre_tokenizers

    from llmret.llara.variants import EBAE_PROMPT, EBAR_PROMPT

    split = pre_tokenizers.Whitespace()
    words = list(SPECIALS)
    for text in (EBAE_PROMPT, EBAR_PROMPT, "query: passage:"):
        words += [w for w, _ in split.pre_tokenize_str(text) if w not in words]
    fillers = size - len(words)
    if fillers < 16:
        raise ValueError(f"vocabulary of {size} leaves no room for filler words")
    return words + [f"w{i}" for i in range(fillers)]


def filler_count(size: int) -> int:
    return sum(1 for w in vocabulary(size) if w.startswith("w") and w[1:].isdigit())


def build_tokenizer(size: int, out_dir: Path) -> None:
    """A word-level fast tokenizer over :func:`vocabulary` (one token a word or punctuation
    mark, no special tokens added around a text), saved as an HF tokenizer folder: built
    here, so the check needs no model package and no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))


def synthetic_texts(n: int, words: tuple[int, int], seed: int, vocab_size: int) -> list[str]:
    """``n`` texts of ``words[0]..words[1]`` filler words drawn from a Zipf-like distribution
    (so bags of words repeat terms, as text does); each word is one token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fillers = filler_count(vocab_size)
    p = 1.0 / np.arange(1, fillers + 1)
    p /= p.sum()
    lengths = rng.integers(words[0], words[1] + 1, size=n)
    ids = rng.choice(fillers, size=int(lengths.sum()), p=p)
    names = np.array([f"w{i}" for i in range(fillers)], dtype=object)
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(names[ids[pos : pos + length]]))
        pos += length
    return out


def llama_config(sizes: Sizes, layers: int):
    """The dense random Llama: Llama-2-7B's width (multi-head attention), ``layers`` deep."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def ensure_model(ctx: Context, layers: int) -> Path:
    """A randomly initialised dense Llama of ``layers`` layers with the synthetic tokenizer,
    saved in the run's dtype (bf16 on a GPU, created there: seconds instead of a minute)."""
    out = ctx.work / "models" / f"llama-{layers}L"
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(llama_config(ctx.sizes, layers), dtype=getattr(torch, ctx.dtype_name))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(ctx.work / "tokenizer")).save_pretrained(str(tmp))
    del model
    if ctx.gpu:
        torch.cuda.empty_cache()
    os.replace(tmp, out)
    return out


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_figure(device: str) -> tuple[float, str]:
    """(GB, what it is) of this process's peak memory: PyTorch's device allocation on CUDA,
    the resident set on the CPU (imports included)."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9, "GB device alloc"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "GB host RSS"
