"""Snakemake entry point: unpack a BEIR zip (members checked, only the dataset's own files,
within the config's download caps, atomic) into its folder. The caps are read from the
config, not params: they decide whether an archive is accepted, not what it unpacks to."""

from llmret import atomic_files, logs, specs
from llmret.data import archives

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
limits = archives.ExtractLimits(**specs.own_settings(archives.ExtractLimits, sm.config["download"]))
archives.safe_extract_zip(
    sm.input[0], sm.output[0], strip_top_level=sm.params.folder, members=archives.BEIR_MEMBERS, limits=limits
)
