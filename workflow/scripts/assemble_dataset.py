"""Snakemake entry point: assemble a BEIR folder from raw MS MARCO / TREC files."""

import logging
from pathlib import Path

from llmret import atomic_files, logs
from llmret.data import rawfiles

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
folder = Path(sm.input[0]).parent


def raw(entry: dict) -> rawfiles.RawFile:
    return rawfiles.RawFile(folder / entry["file"], entry.get("member"))


layout = sm.params.layout
splits = {s: rawfiles.Split(raw(p["queries"]), raw(p["qrels"])) for s, p in layout["splits"].items()}
counts = rawfiles.assemble(raw(layout["corpus"]), splits, sm.output[0])
logging.info("assembled %s: %s", sm.output[0], counts)
