"""Known public datasets, so a BEIR dataset is one config line: ``nfcorpus: {}``.

Checksums are the md5s the BEIR authors publish for their zips (BEIR README, "Available
Datasets"). CQADupstack is left out: its zip nests one BEIR folder per forum.
"""

from __future__ import annotations

from collections.abc import Mapping

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"

BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}

# Corpus sizes (passages) as the BEIR paper lists them (Thakur et al. 2021, Table 1), to
# plan encode shards before a corpus is downloaded.
BEIR_CORPUS_SIZE = {
    "msmarco": 8_841_823,
    "trec-covid": 171_332,
    "nfcorpus": 3_633,
    "nq": 2_681_468,
    "hotpotqa": 5_233_329,
    "fiqa": 57_638,
    "arguana": 8_674,
    "webis-touche2020": 382_545,
    "quora": 522_931,
    "dbpedia-entity": 4_635_922,
    "scidocs": 25_657,
    "fever": 5_416_568,
    "climate-fever": 5_416_593,
    "scifact": 5_183,
}

# The split BEIR evaluates on, where it is not "test".
BEIR_EVAL_SPLIT = {"msmarco": "dev"}


def complete_dataset(name: str, cfg: Mapping) -> dict:
    """Fill ``url``, ``md5``, ``corpus_size``, ``split``, ``zip_folder`` and ``mirror_path`` of a BEIR zip
    dataset where the config omits them. A known BEIR dataset is found by its zip's folder
    (``zip_folder``, default the dataset's name), so ``scifact-small: {zip_folder: scifact,
    subsample: ...}`` is a second, differently subsampled copy of SciFact."""
    out = dict(cfg)
    # BEIR's convention for its zips; raw files (MS MARCO, TREC DL) are scored as official
    # tools score them, where a passage may share its number with a query.
    out.setdefault("ignore_identical_ids", "files" not in out)
    if "files" in out:  # assembled from raw files: nothing of BEIR's applies
        splits = list(out["files"].get("splits") or {})
        out.setdefault("split", splits[0] if len(splits) == 1 else "test")
        return out
    folder = out.setdefault("zip_folder", name)
    if folder in BEIR_MD5:
        out.setdefault("url", BEIR_URL.format(name=folder))
        out.setdefault("md5", BEIR_MD5[folder])
        out.setdefault("corpus_size", BEIR_CORPUS_SIZE[folder])
    out.setdefault("mirror_path", f"beir/{folder}.zip")
    out.setdefault("split", BEIR_EVAL_SPLIT.get(folder, "test"))
    return out
