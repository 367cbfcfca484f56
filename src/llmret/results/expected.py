"""Expected scores: a preset's published or previously measured numbers, with tolerances,
checked against what a run produced (in the spirit of Pyserini's two-click reproductions).

An expected-scores file is YAML::

    cells:
      - {system: bm25, dataset: scifact, metric: ndcg@10, value: 0.679, tolerance: 0.002,
         source: "Pyserini BEIR (flat)"}

Each cell is compared with ``results/metrics/{system}/{dataset}.json``: within
``tolerance`` (absolute) it is ``ok``, otherwise it ``drift``s up or down. Errors name the
file and the line of the offending cell, so a typo in a 60-cell matrix is one look away.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llmret.atomic_files import atomic_write_text

REQUIRED = ("system", "dataset", "metric", "value", "tolerance")
OPTIONAL = ("source",)
COLUMNS = ("system", "dataset", "metric", "expected", "measured", "delta", "tolerance", "status", "source")


class ExpectedError(ValueError):
    """A malformed expected-scores file or a cell that cannot be checked."""


@dataclass(frozen=True)
class Cell:
    system: str
    dataset: str
    metric: str
    value: float
    tolerance: float
    source: str = ""
    line: int = 0  # 1-based line of the cell in its file (0: not from a file)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.system, self.dataset, self.metric)


@dataclass(frozen=True)
class Outcome:
    system: str
    dataset: str
    metric: str
    expected: float
    measured: float
    delta: float
    tolerance: float
    status: str  # ok | drift-up | drift-down
    source: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _number(node: yaml.Node, where: str, name: str) -> float:
    value = yaml.safe_load(yaml.serialize(node)) if isinstance(node, yaml.Node) else node
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExpectedError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def parse(text: str, name: str = "<expected>") -> list[Cell]:
    """Cells of an expected-scores document; ``name`` is used in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ExpectedError(f"{name}: not valid YAML: {e}") from e
    if not isinstance(root, yaml.MappingNode):
        raise ExpectedError(f"{name}: expected a mapping with a `cells:` list")
    top = {k.value: v for k, v in root.value}
    unknown = set(top) - {"cells", "description"}
    if unknown:
        raise ExpectedError(f"{name}: unknown top-level keys {sorted(unknown)} (allowed: cells, description)")
    cells_node = top.get("cells")
    if not isinstance(cells_node, yaml.SequenceNode) or not cells_node.value:
        raise ExpectedError(f"{name}: `cells:` must be a non-empty list")
    cells: list[Cell] = []
    seen: dict[tuple[str, str, str], int] = {}
    for node in cells_node.value:
        line = node.start_mark.line + 1
        where = f"{name}:{line}"
        if not isinstance(node, yaml.MappingNode):
            raise ExpectedError(f"{where}: a cell must be a mapping with {', '.join(REQUIRED)}")
        fields = {k.value: v for k, v in node.value}
        missing = [k for k in REQUIRED if k not in fields]
        if missing:
            raise ExpectedError(f"{where}: missing {', '.join(missing)}")
        unknown = set(fields) - set(REQUIRED) - set(OPTIONAL)
        if unknown:
            raise ExpectedError(f"{where}: unknown keys {sorted(unknown)}")
        strings = {}
        for k in ("system", "dataset", "metric", "source"):
            if k in fields:
                if not isinstance(fields[k], yaml.ScalarNode) or not str(fields[k].value).strip():
                    raise ExpectedError(f"{where}: {k} must be a non-empty string")
                strings[k] = str(fields[k].value)
        value = _number(fields["value"], where, "value")
        tolerance = _number(fields["tolerance"], where, "tolerance")
        if tolerance < 0:
            raise ExpectedError(f"{where}: tolerance must be >= 0, got {tolerance}")
        cell = Cell(
            strings["system"], strings["dataset"], strings["metric"], value, tolerance, strings.get("source", ""), line
        )
        if cell.key in seen:
            raise ExpectedError(f"{where}: {'/'.join(cell.key)} is already expected at line {seen[cell.key]}")
        seen[cell.key] = line
        cells.append(cell)
    return cells


def load(path: str | os.PathLike) -> list[Cell]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ExpectedError(f"{path}: cannot read expected scores: {e.strerror}") from e
    return parse(text, str(path))


def check_names(
    cells: Iterable[Cell],
    systems: Iterable[str],
    datasets: Iterable[str],
    metrics: Iterable[str],
    name: str = "<expected>",
) -> None:
    """Every cell must name a configured system and dataset and an evaluated metric: a
    check that silently skips a misspelt cell would pass for the wrong reason."""
    known = {"system": set(systems), "dataset": set(datasets), "metric": set(metrics)}
    for c in cells:
        for field, allowed in known.items():
            if getattr(c, field) not in allowed:
                raise ExpectedError(
                    f"{name}:{c.line}: {field} {getattr(c, field)!r} is not in the config's "
                    f"{'evaluation.metrics' if field == 'metric' else field + 's'} ({sorted(allowed)})"
                )


def compare(cells: Iterable[Cell], measured: Mapping[tuple[str, str, str], float]) -> list[Outcome]:
    """One outcome per cell; ``measured[(system, dataset, metric)]`` must hold every cell.
    The boundary counts as ok (|delta| <= tolerance, with a 1e-12 slack for float noise)."""
    out = []
    for c in cells:
        if c.key not in measured:
            raise ExpectedError(f"line {c.line}: no measured value for {'/'.join(c.key)}")
        m = float(measured[c.key])
        delta = m - c.value
        if abs(delta) <= c.tolerance + 1e-12:
            status = "ok"
        else:
            status = "drift-up" if delta > 0 else "drift-down"
        out.append(Outcome(c.system, c.dataset, c.metric, c.value, m, delta, c.tolerance, status, c.source))
    return out


def measured_values(
    cells: Iterable[Cell], runs: Mapping[tuple[str, str], Mapping[str, float]]
) -> dict[tuple[str, str, str], float]:
    """Each cell's value from ``runs[(system, dataset)]`` (a metrics mapping); a metric the
    evaluation did not compute is an error naming the cell's line."""
    out = {}
    for c in cells:
        metrics = runs.get((c.system, c.dataset))
        if metrics is None or c.metric not in metrics:
            raise ExpectedError(f"line {c.line}: no measured {c.metric} for {c.system} on {c.dataset}")
        out[c.key] = float(metrics[c.metric])
    return out


def raise_on_drift(outcomes: list[Outcome], name: str) -> None:
    if not all(o.ok for o in outcomes):
        raise ExpectedError(f"{name}: {summary(outcomes)}")


def render(outcomes: Iterable[Outcome]) -> str:
    """The outcomes as TSV (header included), numbers with 4 decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(COLUMNS)
    for o in outcomes:
        row = asdict(o)
        for k in ("expected", "measured", "delta", "tolerance"):
            row[k] = f"{row[k]:+.4f}" if k == "delta" else f"{row[k]:.4f}"
        w.writerow([row[k] for k in COLUMNS])
    return buf.getvalue()


def summary(outcomes: list[Outcome]) -> str:
    """One line per drifting cell, or a one-line all-clear."""
    drifts = [o for o in outcomes if not o.ok]
    if not drifts:
        return f"all {len(outcomes)} expected cells within tolerance"
    lines = [f"{len(drifts)} of {len(outcomes)} expected cells drift:"]
    for o in drifts:
        lines.append(
            f"  {o.system} / {o.dataset} / {o.metric}: measured {o.measured:.4f}, expected "
            f"{o.expected:.4f} ± {o.tolerance:.4f} ({o.delta:+.4f}){'  [' + o.source + ']' if o.source else ''}"
        )
    return "\n".join(lines)


def write_report(outcomes: list[Outcome], path: str | os.PathLike) -> None:
    atomic_write_text(path, render(outcomes))
