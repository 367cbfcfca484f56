"""Expected-scores files: parsing with file:line errors, comparison at the tolerance edge,
and the preset files naming only systems, datasets and metrics their configs have."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from llmret import checks
from llmret.results import expected

GOOD = """\
description: toy
cells:
  - {system: bm25, dataset: scifact, metric: ndcg@10, value: 0.679, tolerance: 0.002, source: pyserini}
  - system: dense
    dataset: scifact
    metric: mrr@10
    value: 0.5
    tolerance: 0
"""


def test_parse_keeps_values_and_lines():
    cells = expected.parse(GOOD, "toy.yaml")
    assert [(c.key, c.value, c.tolerance, c.line) for c in cells] == [
        (("bm25", "scifact", "ndcg@10"), 0.679, 0.002, 3),
        (("dense", "scifact", "mrr@10"), 0.5, 0.0, 4),
    ]
    assert cells[0].source == "pyserini" and cells[1].source == ""


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("{system: a, dataset: d, metric: m, value: 1}", "toy.yaml:4: missing tolerance"),
        ("{system: a, dataset: d, metric: m, value: x, tolerance: 0}", "toy.yaml:4: value must be a finite number"),
        ("{system: a, dataset: d, metric: m, value: .nan, tolerance: 0}", "value must be a finite number"),
        ("{system: a, dataset: d, metric: m, value: 1, tolerance: -1}", "toy.yaml:4: tolerance must be >= 0"),
        ("{system: a, dataset: d, metric: m, value: 1, tolerance: 0, colour: red}", "unknown keys ['colour']"),
        ("{system: bm25, dataset: scifact, metric: ndcg@10, value: 1, tolerance: 0}", "already expected at line 3"),
        ("{system: '', dataset: d, metric: m, value: 1, tolerance: 0}", "system must be a non-empty string"),
    ],
)
def test_bad_cells_are_named_by_file_and_line(cell, message):
    text = "description: t\ncells:\n  - {system: bm25, dataset: scifact, metric: ndcg@10, value: 0, tolerance: 0}\n"
    with pytest.raises(expected.ExpectedError, match=__import__("re").escape(message)):
        expected.parse(text + f"  - {cell}\n", "toy.yaml")


@pytest.mark.parametrize("text", ["[1, 2]", "cells: []", "cells: {a: 1}", "cellz: []", "cells: [1"])
def test_bad_documents(text):
    with pytest.raises(expected.ExpectedError, match="toy.yaml"):
        expected.parse(text, "toy.yaml")


def test_compare_at_the_tolerance_edge():
    cells = expected.parse(GOOD)
    ok = expected.compare(cells, {cells[0].key: 0.681, cells[1].key: 0.5})
    assert [o.status for o in ok] == ["ok", "ok"]
    assert ok[0].delta == pytest.approx(0.002)
    moved = expected.compare(cells, {cells[0].key: 0.6769, cells[1].key: 0.5001})
    assert [o.status for o in moved] == ["drift-down", "drift-up"]
    text = expected.summary(moved)
    assert text.startswith("2 of 2 expected cells drift")
    assert "bm25 / scifact / ndcg@10: measured 0.6769, expected 0.6790 ± 0.0020 (-0.0021)  [pyserini]" in text
    with pytest.raises(expected.ExpectedError, match="toy.yaml: 2 of 2"):
        expected.raise_on_drift(moved, "toy.yaml")
    expected.raise_on_drift(ok, "toy.yaml")  # no drift, no error
    assert expected.summary(ok) == "all 2 expected cells within tolerance"


def test_measured_values_and_report(tmp_path):
    cells = expected.parse(GOOD)
    runs = {("bm25", "scifact"): {"ndcg@10": 0.7}, ("dense", "scifact"): {"mrr@10": 0.5, "ndcg@10": 0.1}}
    measured = expected.measured_values(cells, runs)
    assert measured == {cells[0].key: 0.7, cells[1].key: 0.5}
    with pytest.raises(expected.ExpectedError, match="line 4: no measured mrr@10 for dense on scifact"):
        expected.measured_values(cells, {**runs, ("dense", "scifact"): {"ndcg@10": 0.1}})
    out = tmp_path / "r" / "check.tsv"
    expected.write_report(expected.compare(cells, measured), out)
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(expected.COLUMNS)
    assert lines[1].split("\t") == [
        "bm25",
        "scifact",
        "ndcg@10",
        "0.6790",
        "0.7000",
        "+0.0210",
        "0.0020",
        "drift-up",
        "pyserini",
    ]
    assert not [p for p in out.parent.iterdir() if p.name != "check.tsv"]


def test_check_names_rejects_unknown_system_with_line():
    cells = expected.parse(GOOD, "toy.yaml")
    expected.check_names(cells, ["bm25", "dense"], ["scifact"], ["ndcg@10", "mrr@10"], "toy.yaml")
    with pytest.raises(expected.ExpectedError, match=r"toy.yaml:4: system 'dense' is not in the config's systems"):
        expected.check_names(cells, ["bm25"], ["scifact"], ["ndcg@10", "mrr@10"], "toy.yaml")
    with pytest.raises(expected.ExpectedError, match=r"toy.yaml:4: metric 'mrr@10' is not in the config's evaluation"):
        expected.check_names(cells, ["bm25", "dense"], ["scifact"], ["ndcg@10"], "toy.yaml")


def _merged(*files: Path) -> dict:
    """Snakemake's key-by-key merge of config files over the default."""

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    out: dict = {}
    for f in files:
        out = merge(out, yaml.safe_load(f.read_text()))
    return out


@pytest.mark.parametrize("preset", [[], ["smoke.yaml"]])
def test_shipped_expected_files_match_their_configs(preset):
    conf = _merged(ROOT / "config" / "config.yaml", *[ROOT / "config" / p for p in preset])
    conf.setdefault("evaluation", {}).setdefault("metrics", ["ndcg@10", "mrr@10", "recall@100", "recall@1000"])
    conf["expected"]["file"] = str(ROOT / conf["expected"]["file"])
    cells = checks.expected_cells(conf)
    assert len(cells) >= 5
    assert {c.system for c in cells} <= set(conf["systems"])
