"""Snakemake entry point: fetch one download (dataset zip, raw file, negatives file, DPR
Wikipedia) from upstream or the mirror, md5-verified. Where it comes from is read from the
config here, not passed as params: the md5 (the params) pins the content."""

from llmret import atomic_files, logs
from llmret.data import download, sources

sm = snakemake  # noqa: F821 - injected by Snakemake
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
entry = sources.download_source(sm.config, sm.params.kind, dict(sm.wildcards))
settings = sm.config["download"]
source = download.resolve_source(entry["url"], sources.mirror(sm.config), entry["mirror_path"])
download.fetch(source, sm.output[0], sm.params.md5, retries=settings["retries"], timeout=settings["timeout"])
