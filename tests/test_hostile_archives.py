"""Hostile dataset zips (issue 30, items 4 and 12): a zip bomb, members outside the BEIR
layout and duplicate member names are refused or skipped before anything is written, and a
failure leaves no temporary folder behind. Caps are tested small; nothing large is written."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

import pytest

from llmret import schema
from llmret.data import archives
from llmret.data.archives import UnsafeArchiveError, safe_extract_zip

GIB = 1 << 30


def _zip(path: Path, members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _beir(path: Path, extra: list[tuple[str, bytes]] = (), corpus: bytes = b'{"_id": "d1", "text": "x"}\n') -> Path:
    return _zip(
        path,
        [
            ("toy/corpus.jsonl", corpus),
            ("toy/queries.jsonl", b'{"_id": "q1", "text": "y"}\n'),
            ("toy/qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\t1\n"),
            *extra,
        ],
    )


def _left(work: Path) -> list[str]:
    return sorted(os.listdir(work)) if work.exists() else []


def test_limits_come_from_the_schema_and_refuse_what_it_refuses():
    limits = archives.ExtractLimits()
    for key in ("max_unpacked_gib", "max_member_gib", "max_ratio"):
        assert getattr(limits, key) == schema.default("download", key)
    assert limits.max_ratio < 1000  # a deflate bomb reaches about 1000:1
    with pytest.raises(ValueError, match=r"download\.max_ratio must be a number >= 1, got 0\.5"):
        archives.ExtractLimits(max_ratio=0.5)
    with pytest.raises(ValueError, match=r"download\.max_member_gib must be a number > 0"):
        archives.ExtractLimits(max_member_gib=0)


def test_a_highly_compressible_member_is_refused_before_anything_is_written(tmp_path):
    """The bomb's shape at a small size: 1 MiB of zeros deflates about 1000:1."""
    arc = _beir(tmp_path / "bomb.zip", corpus=b"\0" * (1 << 20))
    info = zipfile.ZipFile(arc).getinfo("toy/corpus.jsonl")
    assert info.file_size > 500 * info.compress_size
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match=r"download\.max_ratio") as ei:
        safe_extract_zip(arc, work / "toy", strip_top_level="toy", limits=archives.ExtractLimits(max_ratio=100))
    assert str(arc) in str(ei.value) and "'toy/corpus.jsonl'" in str(ei.value)
    assert _left(work) == [] and sorted(os.listdir(tmp_path)) == ["bomb.zip"]


def test_a_member_over_the_member_cap_is_refused(tmp_path):
    arc = _beir(tmp_path / "big.zip", corpus=os.urandom(5000))
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match=r"download\.max_member_gib") as ei:
        limits = archives.ExtractLimits(max_member_gib=4000 / GIB)
        safe_extract_zip(arc, work / "toy", strip_top_level="toy", limits=limits)
    assert "'toy/corpus.jsonl'" in str(ei.value) and str(arc) in str(ei.value)
    assert _left(work) == []


def test_members_over_the_total_cap_are_refused_and_an_old_target_kept(tmp_path):
    arc = _beir(tmp_path / "big.zip", corpus=os.urandom(3000), extra=[("toy/qrels/dev.tsv", os.urandom(3000))])
    target = tmp_path / "work" / "toy"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("old")
    limits = archives.ExtractLimits(max_unpacked_gib=5000 / GIB, max_member_gib=4000 / GIB)
    with pytest.raises(UnsafeArchiveError, match=r"download\.max_unpacked_gib") as ei:
        safe_extract_zip(arc, target, strip_top_level="toy", limits=limits)
    assert str(arc) in str(ei.value)
    assert _left(target.parent) == ["toy"] and os.listdir(target) == ["keep.txt"]


def test_a_member_that_unpacks_to_more_than_it_declares_is_stopped_while_writing(tmp_path, monkeypatch):
    """The caps hold for the bytes written, not only the sizes the zip's directory declares."""
    arc = _beir(tmp_path / "lie.zip", corpus=os.urandom(3000))
    real = zipfile.ZipFile.infolist

    def lying(self):
        infos = real(self)
        for info in infos:
            info.file_size = min(info.file_size, 100)
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying)
    work = tmp_path / "work"
    with pytest.raises(archives.ArchiveError, match=re.escape("toy/corpus.jsonl")) as ei:
        limits = archives.ExtractLimits(max_member_gib=1000 / GIB)
        safe_extract_zip(arc, work / "toy", strip_top_level="toy", limits=limits)
    assert str(arc) in str(ei.value)
    assert _left(work) == []


def test_only_the_beir_files_are_extracted(tmp_path, caplog):
    arc = _beir(
        tmp_path / "extra.zip",
        extra=[
            ("toy/run.sh", b"rm -rf ~\n"),
            ("toy/qrels/nested/x.tsv", b"q\td\t1\n"),
            ("toy/corpus.jsonl.bak", b"{}\n"),
            ("toy/docs/README.md", b"hi"),
        ],
    )
    target = safe_extract_zip(arc, tmp_path / "toy", strip_top_level="toy", members=archives.BEIR_MEMBERS)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["corpus.jsonl", "qrels/test.tsv", "queries.jsonl"]
    assert not (target / "docs").exists() and not (target / "qrels" / "nested").exists()
    assert "toy/run.sh" in caplog.text and "outside ['corpus.jsonl'" in caplog.text


def test_the_workflow_unpacks_only_beir_files_with_the_configs_caps():
    text = (Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "unpack_dataset.py").read_text()
    assert "members=archives.BEIR_MEMBERS" in text and "ExtractLimits" in text


@pytest.mark.parametrize(
    "second",
    ["toy/corpus.jsonl", "toy/./corpus.jsonl", "toy\\corpus.jsonl", "toy/qrels/../corpus.jsonl"],
    ids=["same", "dot", "backslash", "dotdot"],
)
def test_a_member_named_twice_is_refused_naming_archive_and_member(tmp_path, second):
    arc = _beir(tmp_path / "dup.zip")
    with zipfile.ZipFile(arc, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of an exact duplicate, and writes it
        zf.writestr(second, b'{"_id": "evil", "text": "second copy wins"}\n')
    work = tmp_path / "work"
    with pytest.raises(UnsafeArchiveError, match="more than once") as ei:
        safe_extract_zip(arc, work / "toy", strip_top_level="toy")
    assert str(arc) in str(ei.value) and repr(second) in str(ei.value)
    assert _left(work) == []


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_folder_entry_repeated_is_harmless(tmp_path):
    arc = _beir(tmp_path / "dirs.zip", extra=[("toy/qrels/", b""), ("toy/qrels/", b"")])
    target = safe_extract_zip(arc, tmp_path / "toy", strip_top_level="toy")
    assert (target / "qrels" / "test.tsv").is_file()
