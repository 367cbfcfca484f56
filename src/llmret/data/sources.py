"""Where each download of a config comes from: dataset zips, the raw files of assembled
datasets (each distinct URL once), released negatives files and DPR Wikipedia, with the
mirror that replaces every upstream URL. A job reads its source here; only the md5 (the
content) is a rule param, so a moved URL or mirror reruns nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

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
