"""Snakemake entry point: unpack a BEIR zip (members checked, atomic) into its folder."""

from llmret import atomic_files, logs
from llmret.data import archives

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
archives.safe_extract_zip(sm.input[0], sm.output[0], strip_top_level=sm.params.folder)
