"""Snakemake entry point: the first N passages of DPR's Wikipedia, streamed (upstream or mirror)."""

import json

from llmret import atomic_files, logs
from llmret.data import download, dpr, sources

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
entry = sources.download_source(sm.config, "dpr_wiki", dict(sm.wildcards))
source = download.resolve_source(sm.params.url, sources.mirror(sm.config), entry["mirror_path"])
info = dpr.fetch_dpr_prefix(source, sm.output.tsv, int(sm.wildcards.n), timeout=sm.config["download"]["timeout"])
with open(sm.output.info, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
