"""Snakemake entry point: compare a run's metrics with the expected-scores file."""

import sys

from llmret import atomic_files, logs
from llmret.results import expected, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
cells = expected.load(sm.input.expected)
runs = {
    (s, d): tables.read_metrics(path, sm.params.cells[f"{s}/{d}"])["metrics"]
    for (s, d), path in zip(sm.params.runs, sm.input.metrics, strict=True)
}
outcomes = expected.compare(cells, expected.measured_values(cells, runs))
print(expected.render(outcomes), expected.summary(outcomes), sep="\n", file=sys.stderr)
if sm.params.on_drift == "error":
    expected.raise_on_drift(outcomes, sm.input.expected)
expected.write_report(outcomes, sm.output[0])
