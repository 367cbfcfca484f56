"""Snakemake entry point: validate a BEIR folder, subsample if the preset says so, write it."""

from pathlib import Path

from llmret import atomic_files, logs
from llmret.data import beir

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
p = sm.params
full = beir.load_dataset(sm.input[0], split=p.split, on_unknown=p.on_unknown)
spec = beir.Subsample(**p.subsample)
ds = beir.subsample(full, spec)
meta = {"dataset": sm.wildcards.dataset, "split": p.split, **beir.subsample_record(spec, full, ds)}
beir.write_dataset(ds, Path(sm.output.info).parent, meta=meta)
