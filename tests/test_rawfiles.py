"""Datasets assembled from raw MS MARCO / TREC files: the BEIR layout they produce, the
errors that name the file and line, and the workflow fetching a shared archive once."""

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import pytest
import yaml
from conftest import ROOT

from llmret import checks, specs
from llmret.data import beir, rawfiles, sources
from llmret.data.beir import BeirFormatError

COLLECTION = "0\tThe cat sat on the mat.\n1\tDogs bark at night.\n2\tBirds sing at dawn.\n3\tFish swim.\n"
DEV_QUERIES = "100\twhat do cats sit on\n101\twhen do birds sing\n"
DEV_QRELS = "100\t0\t0\t1\n101\t0\t2\t1\n"  # MS MARCO's dev qrels: tabs
TRAIN_QUERIES = "200\tdog noise\n"
TRAIN_QRELS = "200\t0\t1\t1\n"
DL_QUERIES = "300\tfish movement\n100\twhat do cats sit on\n"
DL_QRELS = "300 Q0 3 3\n300 Q0 1 0\n100 Q0 0 2\n"  # NIST's: spaces, graded


def _tar(path, members: dict[str, str | bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text if isinstance(text, bytes) else text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    _tar(
        d / "collectionandqueries.tar.gz",
        {
            "collection.tsv": COLLECTION,
            "queries.dev.small.tsv": DEV_QUERIES,
            "qrels.dev.small.tsv": DEV_QRELS,
            "queries.train.tsv": TRAIN_QUERIES,
            "qrels.train.tsv": TRAIN_QRELS,
        },
    )
    (d / "test2019-queries.tsv.gz").write_bytes(gzip.compress(DL_QUERIES.encode()))
    (d / "2019qrels-pass.txt").write_text(DL_QRELS)
    return d


def _msmarco(d):
    tar = d / "collectionandqueries.tar.gz"
    return rawfiles.RawFile(tar, "collection.tsv"), {
        "dev": rawfiles.Split(
            rawfiles.RawFile(tar, "queries.dev.small.tsv"), rawfiles.RawFile(tar, "qrels.dev.small.tsv")
        ),
        "train": rawfiles.Split(rawfiles.RawFile(tar, "queries.train.tsv"), rawfiles.RawFile(tar, "qrels.train.tsv")),
        "dl19": rawfiles.Split(
            rawfiles.RawFile(d / "test2019-queries.tsv.gz"), rawfiles.RawFile(d / "2019qrels-pass.txt")
        ),
    }


def test_assemble_writes_the_beir_layout(raw, tmp_path):
    corpus, splits = _msmarco(raw)
    counts = rawfiles.assemble(corpus, splits, tmp_path / "ms")
    assert counts["documents"] == 4 and counts["queries"] == 4  # query 100 is in dev and dl19
    assert counts["splits"]["dl19"] == {"queries": 2, "judged_queries": 2, "judgments": 3}
    dev = beir.load_dataset(tmp_path / "ms", split="dev")
    assert dev.corpus.ids == ["0", "1", "2", "3"]
    assert dev.corpus.texts[2] == "Birds sing at dawn." and dev.corpus.titles == [""] * 4
    assert dev.queries == {"100": "what do cats sit on", "101": "when do birds sing"}
    assert dev.qrels == {"100": {"0": 1}, "101": {"2": 1}}
    dl19 = beir.load_dataset(tmp_path / "ms", split="dl19")
    assert dl19.qrels == {"300": {"3": 3, "1": 0}, "100": {"0": 2}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ms")]


@pytest.mark.parametrize(
    ("member", "text", "message"),
    [
        (
            "collection.tsv",
            "0\tok\n1 no tab here\n",
            "collectionandqueries.tar.gz:collection.tsv:2: expected 'id<TAB>text'",
        ),
        ("collection.tsv", "0\ta\n0\tb\n", "document id '0' appears twice"),
        ("qrels.dev.small.tsv", "100\t0\t0\n", "qrels.dev.small.tsv:1: expected 4 columns"),
        ("qrels.dev.small.tsv", "100\t0\t0\tyes\n", "qrels.dev.small.tsv:1: grade 'yes' is not an integer"),
        ("qrels.dev.small.tsv", "100\t0\t0\t1\n100\t0\t0\t2\n", "(100, 0) judged twice, different grades"),
        ("queries.train.tsv", "100\tanother text\n", "query '100' has another text in an earlier split"),
        (
            "collection.tsv",
            b"0\tok\n1\tcaf\xe9\n",
            "collectionandqueries.tar.gz:collection.tsv:2: not UTF-8 (byte 0xe9",
        ),
    ],
)
def test_malformed_files_are_named_and_leave_nothing(raw, tmp_path, member, text, message):
    members = {
        "collection.tsv": COLLECTION,
        "queries.dev.small.tsv": DEV_QUERIES,
        "qrels.dev.small.tsv": DEV_QRELS,
        "queries.train.tsv": TRAIN_QUERIES,
        "qrels.train.tsv": TRAIN_QRELS,
    }
    _tar(raw / "collectionandqueries.tar.gz", {**members, member: text})
    corpus, splits = _msmarco(raw)
    with pytest.raises(BeirFormatError, match=__import__("re").escape(message)):
        rawfiles.assemble(corpus, splits, tmp_path / "ms")
    assert not list(tmp_path.glob("*ms*"))


def test_missing_member_and_non_tar(raw, tmp_path):
    tar = raw / "collectionandqueries.tar.gz"
    with pytest.raises(BeirFormatError, match="has no member 'collection.tsvx'"):
        list(rawfiles.read_tsv(rawfiles.RawFile(tar, "collection.tsvx")))
    with pytest.raises(BeirFormatError, match="2019qrels-pass.txt: not a readable tar archive"):
        list(rawfiles.read_tsv(rawfiles.RawFile(raw / "2019qrels-pass.txt", "x")))


def test_a_member_named_twice_in_a_tar_is_refused(tmp_path):
    """Issue 30, item 12, for the raw files' archives: the last copy must not silently win."""
    path = tmp_path / "dup.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("collection.tsv", COLLECTION), ("./collection.tsv", "0\tinjected\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    with pytest.raises(BeirFormatError, match=r"dup\.tar\.gz: member 'collection\.tsv' is in the archive 2 times"):
        list(rawfiles.read_tsv(rawfiles.RawFile(path, "collection.tsv")))


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


def _files_config(raw, tar_md5=None):
    base = "https://example.org/msmarco"
    tar = {"url": f"{base}/collectionandqueries.tar.gz", "md5": tar_md5 or _md5(raw / "collectionandqueries.tar.gz")}
    return {
        "toy-dev": {
            "files": {
                "corpus": {**tar, "member": "collection.tsv"},
                "splits": {
                    "dev": {
                        "queries": {**tar, "member": "queries.dev.small.tsv"},
                        "qrels": {**tar, "member": "qrels.dev.small.tsv"},
                    },
                    "train": {
                        "queries": {**tar, "member": "queries.train.tsv"},
                        "qrels": {**tar, "member": "qrels.train.tsv"},
                    },
                },
            },
            "split": "dev",
        },
        "toy-dl19": {
            "files": {
                "corpus": {**tar, "member": "collection.tsv"},
                "splits": {
                    "test": {
                        "queries": {
                            "url": f"{base}/test2019-queries.tsv.gz",
                            "md5": _md5(raw / "test2019-queries.tsv.gz"),
                        },
                        "qrels": {"url": f"{base}/2019qrels-pass.txt", "md5": _md5(raw / "2019qrels-pass.txt")},
                    }
                },
            },
            "relevance_level": 2,
            "corpus_from": "toy-dev",
        },
    }


def test_one_download_per_url_and_conflicts_named(raw):
    datasets = _files_config(raw)
    files = sources.raw_files({"datasets": datasets})
    assert sorted(files) == ["2019qrels-pass.txt", "collectionandqueries.tar.gz", "test2019-queries.tsv.gz"]
    assert files["2019qrels-pass.txt"]["mirror_path"] == "files/2019qrels-pass.txt"
    datasets["toy-dl19"]["files"]["corpus"]["md5"] = "0" * 32
    with pytest.raises(
        specs.ConfigError, match=r"datasets.toy-dl19.files.corpus: 'collectionandqueries.tar.gz' is also"
    ):
        sources.raw_files({"datasets": datasets})


def test_corpus_from_must_share_the_download(raw):
    datasets = _files_config(raw)
    checks._check_shared_corpora(datasets)
    for change, message in [
        ({"corpus_from": "toy-dl19"}, "'toy-dl19' must be another dataset"),
        ({"corpus_from": "nope"}, "'nope' must be another dataset"),
        ({"subsample": {"max_docs": 10}}, "datasets.toy-dl19.subsample.max_docs would make the two corpora differ"),
    ]:
        broken = {**datasets, "toy-dl19": {**datasets["toy-dl19"], **change}}
        with pytest.raises(specs.ConfigError, match=__import__("re").escape(message)):
            checks._check_shared_corpora(broken)
    other = {**datasets["toy-dl19"]["files"], "corpus": {"url": "https://x/c.tsv", "md5": "1" * 32}}
    with pytest.raises(specs.ConfigError, match="do not download the same corpus"):
        checks._check_shared_corpora({**datasets, "toy-dl19": {**datasets["toy-dl19"], "files": other}})


@pytest.mark.integration
def test_workflow_assembles_and_evaluates_files_datasets(raw, tmp_path):
    """Two datasets share the MS MARCO archive: fetched once from the mirror, each
    assembled, prepared, searched with BM25 and evaluated (DL19 graded, level 2)."""
    mirror = tmp_path / "mirror"
    (mirror / "files").mkdir(parents=True)
    for p in raw.iterdir():
        (mirror / "files" / p.name).write_bytes(p.read_bytes())
    conf = {
        "datasets": _files_config(raw),
        "table": {"systems": ["bm25"], "datasets": ["toy-dev", "toy-dl19"]},
        "mirror": str(mirror),
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(conf))
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--cores",
        "2",
        "results/beir_table.csv",
        "--configfile",  # last: it takes every argument after it as a config file
        str(tmp_path / "toy.yaml"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    downloaded = (work / "resources" / "downloads" / "files").iterdir()
    assert len([p for p in downloaded if not p.name.endswith(sources.RECORD_SUFFIX)]) == 3  # each beside its record
    assert proc.stderr.count("rule download_file:") == 3
    assert proc.stderr.count("rule assemble_dataset:") == 2
    assert proc.stderr.count("rule bm25_index:") == 1  # DL19 searches toy-dev's index
    assert not (work / "results" / "index" / "bm25" / "toy-dl19").exists()
    info = json.loads((work / "results" / "data" / "toy-dl19" / "dataset.json").read_text())
    assert info["queries"] == 2
    table = (work / "results" / "beir_table.csv").read_text().splitlines()
    assert table[0] == "system,toy-dev,toy-dl19,avg"
    assert table[1].startswith("bm25,1.0,")  # each dev query's one relevant passage ranks first
