"""Where each download of a config comes from: dataset zips, the raw files of assembled
datasets (each distinct URL once), released negatives files and DPR Wikipedia, with the
mirror that replaces every upstream URL. A job reads its source here; only the md5 (the
content) is a rule param, so a moved URL or mirror reruns nothing; and of the md5s, only
what the file on disk no longer matches (:func:`md5_key`), so accepting a second copy's md5
reruns nothing either."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from llmret.atomic_files import atomic_write_text
from llmret.specs import ConfigError

MIRROR_ENV = "LLMRET_MIRROR"


def _file_entries(ds: Mapping) -> Iterator[tuple[str, Mapping]]:
    files = ds["files"]
    yield "files.corpus", files["corpus"]
    for split, pair in files["splits"].items():
        for role in ("queries", "qrels"):
            yield f"files.splits.{split}.{role}", pair[role]


def file_name(entry: Mapping) -> str:
    """Local name of a raw file's download: the URL's last path segment."""
    return entry["url"].rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def raw_files(config: Mapping) -> dict[str, dict]:
    """Every raw file to download, by local name: url, md5 and mirror path. Two entries
    with the same name must be the same download (URL and md5), so it is fetched once."""
    out: dict[str, dict] = {}
    where: dict[str, str] = {}
    for name, ds in (config.get("datasets") or {}).items():
        if "files" not in ds:
            continue
        for key, entry in _file_entries(ds):
            fname = file_name(entry)
            spec = {
                "url": entry["url"],
                "md5": entry["md5"].lower(),
                "mirror_path": entry.get("mirror_path", f"files/{fname}"),
            }
            if fname in out and out[fname] != spec:
                raise ConfigError(
                    f"datasets.{name}.{key}: {fname!r} is also downloaded by {where[fname]} with another "
                    f"url, md5 or mirror_path ({out[fname]} vs {spec})"
                )
            out.setdefault(fname, spec)
            where.setdefault(fname, f"datasets.{name}.{key}")
    return out


def dataset_files(ds: Mapping) -> dict:
    """A files-dataset's layout with local download names: what the assemble job reads."""
    files = ds["files"]

    def local(entry):
        return {"file": file_name(entry), "member": entry.get("member")}

    return {
        "corpus": local(files["corpus"]),
        "splits": {s: {r: local(p[r]) for r in ("queries", "qrels")} for s, p in files["splits"].items()},
    }


# The wildcard that names a download of each kind (None: there is one such download).
DOWNLOAD_KINDS = {"dataset": "dataset", "file": "file", "negatives": "mining", "dpr_wiki": None}


def download_source(config: Mapping, kind: str, wildcards: Mapping[str, str]) -> dict:
    """Where a download comes from: ``url``, ``md5`` and ``mirror_path``, read from the config
    by the job itself. Only the md5 is a rule param: it pins the content, so a new URL,
    mirror path, retry count or timeout reruns nothing downstream."""
    name = wildcards[DOWNLOAD_KINDS[kind]] if DOWNLOAD_KINDS[kind] else None
    if kind == "dataset":
        ds = config["datasets"][name]
        return {"url": ds["url"], "md5": ds["md5"], "mirror_path": ds["mirror_path"]}
    if kind == "file":
        return raw_files(config)[name]
    if kind == "negatives":
        f = config["mining"][name]["file"]
        return {"url": f["url"], "md5": f["md5"], "mirror_path": f.get("mirror_path", f"negatives/{name}.jsonl.gz")}
    if kind == "dpr_wiki":
        return dict(config["sources"]["dpr_wiki"])
    raise ValueError(f"unknown download kind {kind!r}; known: {sorted(DOWNLOAD_KINDS)}")


def mirror(config: Mapping) -> str | None:
    """The download mirror: the ``mirror`` setting, else the LLMRET_MIRROR variable."""
    return config.get("mirror") or os.environ.get(MIRROR_ENV) or None


# --------------------------------------------------------------------------- md5 rerun key

RECORD_SUFFIX = ".verified.json"


def record_path(download: str | Path) -> Path:
    """The record a download job writes beside its file: the md5 it verified and its rerun key."""
    download = Path(download)
    return download.with_name(download.name + RECORD_SUFFIX)


def write_record(download: str | Path, md5: str, key: object) -> None:
    """Record that ``download`` (of its size now) was verified to have ``md5`` by a job whose
    md5 param was ``key``."""
    record = {"md5": md5.lower(), "key": key, "size": Path(download).stat().st_size}
    atomic_write_text(record_path(download), json.dumps(record) + "\n")


def _current_record(download: Path) -> dict | None:
    """The record of ``download`` if it may describe the file there now (same size; not the
    mtime, which Snakemake touches after the job)."""
    try:
        record = json.loads(record_path(download).read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("size") == download.stat().st_size:
            return record
    except (OSError, ValueError):
        pass
    return None


def md5_key(accepted: str | Sequence[str] | None, download: str | Path) -> object:
    """A download job's md5 param (its rerun key, and so that of every job after it).

    While the file on disk has an md5 that ``accepted`` (the config's md5 or list) still
    holds, the key stays the one the job that wrote the file ran with: adding a mirror copy's
    md5, reordering or dropping another changes nothing, and nothing downstream reruns. When
    the file's md5 is no longer accepted, or no record describes the file, the key is
    ``accepted`` itself, so a changed checksum downloads (and verifies) again. The job still
    checks the bytes against the config's whole list."""
    record = _current_record(Path(download))
    wanted = [accepted] if isinstance(accepted, str) else list(accepted or [])
    if record is not None and str(record.get("md5")).lower() in {m.lower() for m in wanted}:
        return record["key"]
    return accepted
