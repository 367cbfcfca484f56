"""Time per stage from a workdir's benchmark files (llmret.results.timing)."""

from __future__ import annotations

import pytest

from llmret.results.timing import main, stage_times

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(root, rel, seconds, rss, cpu):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t100\t{cpu}\n")


@pytest.fixture
def workdir(tmp_path):
    root = tmp_path / "results" / "benchmarks"
    _bench(root, "sparse_encode/csplade/scifact/corpus-000-of-001.tsv", 700.5, 2800.0, 1400)
    _bench(root, "sparse_encode/csplade/scifact/queries.tsv", 20.0, 1000.0, 30)
    _bench(root, "sparse_encode/bow/scifact/queries.tsv", 4.0, "-", 3)
    _bench(root, "csplade_train/csplade-smollm2.tsv", 966.0, 3500.0, 1795)
    return tmp_path


def test_stages_sum_their_jobs_and_keep_the_largest_peak(workdir):
    table = stage_times(workdir / "results" / "benchmarks").set_index("stage")
    assert table.loc["sparse_encode", "jobs"] == 3
    assert table.loc["sparse_encode", "seconds"] == pytest.approx(724.5)
    assert table.loc["sparse_encode", "cpu_seconds"] == pytest.approx(1433)
    assert table.loc["sparse_encode", "max_rss_mb"] == 2800.0  # "-" (unread) counts as missing
    assert table.loc["total", "jobs"] == 4
    assert table.loc["total", "seconds"] == pytest.approx(1690.5)
    assert table.loc["total", "max_rss_mb"] == 3500.0


def test_by_name_splits_a_stage_by_system_or_run(workdir):
    table = stage_times(workdir / "results" / "benchmarks", by_name=True).set_index(["stage", "name"])
    assert table.loc[("sparse_encode", "csplade"), "seconds"] == pytest.approx(720.5)
    assert table.loc[("sparse_encode", "bow"), "jobs"] == 1
    assert table.loc[("csplade_train", "csplade-smollm2"), "seconds"] == 966.0


def test_a_broken_benchmark_file_is_named(workdir, capsys):
    bad = workdir / "results" / "benchmarks" / "finetune" / "base-ft.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("not\ta benchmark\n")
    assert main([str(workdir)]) == 1
    assert str(bad) in capsys.readouterr().err


def test_an_empty_workdir_says_so(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no benchmark files" in capsys.readouterr().err
