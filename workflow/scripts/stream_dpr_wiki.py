"""Snakemake entry point: the first N passages of DPR's Wikipedia, streamed (upstream or mirror)."""

import json

from llmret import config, logs
from llmret.data import download, dpr

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
p = sm.params
source = download.resolve_source(p.url, config.mirror(sm.config), p.mirror_path)
info = dpr.fetch_dpr_prefix(source, sm.output.tsv, int(sm.wildcards.n), timeout=p.timeout)
with open(sm.output.info, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
