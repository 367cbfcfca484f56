"""Route a job's logging, warnings and progress bars into its Snakemake log file."""

from __future__ import annotations

import logging
import sys
import traceback


def to_file(path: str | None) -> None:
    """Send stderr (where tqdm and warnings write) and logging to ``path``.

    Snakemake captures nothing from ``script:`` jobs by itself; without this a failed job's
    traceback would be lost with the terminal.
    """
    if path:
        terminal = sys.stderr
        sys.stderr = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the job

        def report(kind, value, tb):
            # The error goes to the log and to Snakemake's terminal, which shows the job.
            for stream in (sys.stderr, terminal):
                traceback.print_exception(kind, value, tb, file=stream)

        sys.excepthook = report
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)
