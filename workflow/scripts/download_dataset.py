"""Snakemake entry point: fetch one dataset zip (upstream or mirror), md5-verified."""

from llmret import config, logs
from llmret.data import download

sm = snakemake  # noqa: F821 - injected by Snakemake
logs.to_file(sm.log[0])
p = sm.params
source = download.resolve_source(p.url, config.mirror(sm.config), p.mirror_path)
download.fetch(source, sm.output[0], p.md5, retries=p.retries, timeout=p.timeout)
