"""Time and memory per stage of a workdir, from the ``benchmark:`` files its jobs wrote.

Snakemake writes one TSV per costly job under ``results/benchmarks/<stage>/<name>...``
(wall seconds ``s``, ``cpu_time``, peak RSS ``max_rss`` in MB). This sums them by stage, or
by stage and system/run, so a run's cost per stage can be read (and quoted) without opening
hundreds of files. Job seconds add up jobs that ran side by side (``--cores`` above one job's
threads), so their total can exceed the elapsed time; ``span`` is first start to last end,
idle gaps between invocations included.

    python -m llmret.results.timing WORKDIR [--by-name]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

BENCHMARKS = Path("results/benchmarks")
COLUMNS = ["stage", "name", "jobs", "seconds", "cpu_seconds", "max_rss_mb"]


def read_benchmarks(root: Path) -> pd.DataFrame:
    """One row per benchmark file under ``root``: its stage, name, times, peak RSS and end."""
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        try:
            table = pd.read_csv(path, sep="\t")
            first = table.iloc[0]
            seconds, cpu = float(first["s"]), float(first["cpu_time"])
            # Snakemake writes "-" where psutil could not read a figure.
            rss = float(pd.to_numeric(first["max_rss"], errors="coerce"))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{path}: not a Snakemake benchmark file ({err})") from err
        end = path.stat().st_mtime
        rows.append(
            {
                "stage": parts[0],
                "name": Path(parts[1]).stem if len(parts) == 2 else parts[1],
                "seconds": seconds,
                "cpu_seconds": cpu,
                "max_rss_mb": rss,
                "start": end - seconds,
                "end": end,
            }
        )
    if not rows:
        raise FileNotFoundError(f"{root}: no benchmark files (has the workflow run in this workdir?)")
    return pd.DataFrame(rows)


def stage_times(root: Path, by_name: bool = False) -> pd.DataFrame:
    """Jobs, summed wall and CPU seconds and the largest peak RSS per stage (and name), with a total row."""
    runs = read_benchmarks(root)
    keys = ["stage", "name"] if by_name else ["stage"]
    table = (
        runs.groupby(keys, sort=True)
        .agg(
            jobs=("seconds", "size"),
            seconds=("seconds", "sum"),
            cpu_seconds=("cpu_seconds", "sum"),
            max_rss_mb=("max_rss_mb", "max"),
        )
        .reset_index()
    )
    if not by_name:
        table["name"] = ""
    total = {
        "stage": "total",
        "name": "",
        "jobs": len(runs),
        "seconds": runs["seconds"].sum(),
        "cpu_seconds": runs["cpu_seconds"].sum(),
        "max_rss_mb": runs["max_rss_mb"].max(),
    }
    table = pd.concat([table[COLUMNS], pd.DataFrame([total])], ignore_index=True)
    table.attrs["span_seconds"] = runs["end"].max() - runs["start"].min()
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmret.results.timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="the workflow's working directory (snakemake -d)")
    parser.add_argument("--by-name", action="store_true", help="one row per system or run within each stage")
    args = parser.parse_args(argv)
    try:
        table = stage_times(args.workdir / BENCHMARKS, by_name=args.by_name)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shown = table.assign(
        seconds=table["seconds"].round(0).astype(int),
        cpu_seconds=table["cpu_seconds"].round(0).astype(int),
        max_rss_mb=table["max_rss_mb"].round(0).astype(int),
    )
    if not args.by_name:
        shown = shown.drop(columns="name")
    print(shown.to_string(index=False))
    span = table.attrs["span_seconds"]
    print(f"job seconds {table['seconds'].iloc[-1] / 3600:.2f} h; first start to last end {span / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
