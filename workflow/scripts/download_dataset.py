"""Snakemake entry point: fetch one download (dataset zip, raw file, negatives file, DPR
Wikipedia) from upstream or the mirror, md5-verified. Where it comes from, and the md5s it
must match, are read from the config here, not passed as params: the params carry the md5
rerun key (llmret.data.sources.md5_key), which the job records beside the file when its rule
declares a ``record`` output."""

from llmret import atomic_files, logs
from llmret.data import download, sources

sm = snakemake  # noqa: F821 - injected by Snakemake
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
entry = sources.download_source(sm.config, sm.params.kind, dict(sm.wildcards))
settings = sm.config["download"]
source = download.resolve_source(entry["url"], sources.mirror(sm.config), entry["mirror_path"])
recorded = "record" in sm.output.keys()
download.fetch(
    source,
    sm.output[0],
    entry["md5"],
    retries=settings["retries"],
    timeout=settings["timeout"],
    read_timeout=settings["read_timeout"],
    on_verified=(lambda md5: sources.write_record(sm.output[0], md5, sm.params.md5)) if recorded else None,
)
