import json

import pytest

from llmret.data import beir


def test_load_valid_dataset_keeps_only_judged_queries(beir_folder):
    ds = beir.load_dataset(beir_folder)
    assert ds.corpus.ids == ["d1", "d2", "d3"]
    assert ds.corpus.contents() == ["Cats Cats purr.", "Dogs bark.", "Birds sing."]
    assert ds.queries == {"q1": "cat", "q2": "dog"}
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}


def test_corrupt_corpus_line_names_file_and_line(beir_folder):
    path = beir_folder / "corpus.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut the line mid-record
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(beir.BeirFormatError, match=r"corpus\.jsonl:2: invalid JSON at column \d+: ") as ei:
        beir.load_dataset(beir_folder)
    assert "at at" not in str(ei.value)


def test_duplicate_document_id_names_both_lines(beir_folder):
    with open(beir_folder / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d1", "text": "again"}\n')
    with pytest.raises(beir.BeirFormatError, match=r"corpus\.jsonl:4: duplicate document id 'd1' \(first on line 1\)"):
        beir.load_corpus(beir_folder / "corpus.jsonl")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "x", "text": "y"}', "has no '_id'"),
        ('{"_id": "d9"}', "has no 'text'"),
        ('{"_id": "d 9", "text": "y"}', "contains white space"),
        ('{"_id": "d9", "text": 5}', "'text' must be a string"),
        ('["d9", "y"]', "expected a JSON object"),
    ],
)
def test_bad_records(beir_folder, line, message):
    with open(beir_folder / "corpus.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(beir.BeirFormatError, match=rf"corpus\.jsonl:4: .*{message}"):
        beir.load_corpus(beir_folder / "corpus.jsonl")


def test_numeric_ids_become_strings(beir_folder):
    (beir_folder / "queries.jsonl").write_text('{"_id": 7, "text": "x"}\n')
    assert beir.load_queries(beir_folder / "queries.jsonl") == {"7": "x"}


def test_qrels_errors(beir_folder):
    q = beir_folder / "qrels" / "test.tsv"
    q.write_text("qid\tdid\trel\nq1\td1\t1\n")
    with pytest.raises(beir.BeirFormatError, match=r"test\.tsv:1: expected header"):
        beir.load_qrels(q)
    q.write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(beir.BeirFormatError, match=r"test\.tsv:2: relevance 'yes'"):
        beir.load_qrels(q)
    q.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t0\n")
    with pytest.raises(beir.BeirFormatError, match=r"test\.tsv:3: pair \(q1, d1\) judged twice"):
        beir.load_qrels(q)
    q.write_text("query-id\tcorpus-id\tscore\nq1 d1 1\n")
    with pytest.raises(beir.BeirFormatError, match=r"test\.tsv:2: expected 3 tab-separated columns"):
        beir.load_qrels(q)


def test_unknown_document_in_qrels_errors_or_is_dropped(beir_folder, caplog):
    with open(beir_folder / "qrels" / "test.tsv", "a") as f:
        f.write("q1\tmissing\t1\nq9\td1\t1\n")
    with pytest.raises(
        beir.BeirFormatError, match=r"1 unknown query ids .* 1 unknown document ids.*on_unknown_qrels: drop"
    ):
        beir.load_dataset(beir_folder)
    ds = beir.load_dataset(beir_folder, on_unknown="drop")
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert "dropped 2 judgments" in caplog.text


def test_missing_file_is_named(beir_folder):
    (beir_folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"qrels/test\.tsv"):
        beir.load_dataset(beir_folder)


def test_subsample_keeps_judged_documents_and_is_deterministic(tmp_path):
    corpus = beir.Corpus(ids=[f"d{i}" for i in range(100)], titles=[""] * 100, texts=["t"] * 100)
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 50}": 0} for i in range(20)}
    ds = beir.Dataset(corpus, {q: "x" for q in qrels}, qrels)
    spec = beir.Subsample(max_queries=5, max_docs=30, seed=1)
    a, b = beir.subsample(ds, spec), beir.subsample(ds, spec)
    assert a.queries == b.queries and a.corpus.ids == b.corpus.ids
    assert len(a.queries) == 5 and len(a.corpus) == 30
    judged = {d for q in a.queries for d in qrels[q]}
    assert judged <= set(a.corpus.ids)
    assert a.corpus.ids == [d for d in corpus.ids if d in set(a.corpus.ids)]  # file order kept
    # max_docs below the judged count still keeps every judged document
    small = beir.subsample(ds, beir.Subsample(max_queries=20, max_docs=3))
    assert len(small.corpus) == 40


def test_write_then_load_roundtrip(beir_folder, tmp_path):
    ds = beir.load_dataset(beir_folder)
    out = tmp_path / "out"
    beir.write_dataset(ds, out, meta={"split": "test"})
    assert beir.load_corpus(out / "corpus.jsonl") == ds.corpus
    assert beir.load_queries(out / "queries.jsonl") == ds.queries
    assert beir.load_qrels(out / "qrels.tsv") == ds.qrels
    info = json.loads((out / "dataset.json").read_text())
    assert info == {"documents": 3, "queries": 2, "judgments": 2, "split": "test"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _train_qrels(folder, text):
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + text)


def test_train_split_keeps_positives_and_writes_beir_files(beir_folder, tmp_path):
    _train_qrels(beir_folder, "q3\td3\t1\nq3\td1\t0\n")
    out = tmp_path / "train"
    info = beir.prepare_train_split(beir_folder, beir.TrainSplit(), eval_split="test", out_dir=out)
    assert info["queries"] == 1 and info["positives"] == 1
    assert beir.load_queries(out / "queries.jsonl") == {"q3": "fish"}
    assert beir.load_qrels(out / "qrels.tsv") == {"q3": {"d3": 1}}  # grade 0 is not a positive
    assert json.loads((out / "split.json").read_text())["split"] == "train"


def test_train_split_refuses_queries_of_the_evaluation_split(beir_folder, tmp_path):
    _train_qrels(beir_folder, "q1\td1\t1\nq3\td3\t1\n")
    with pytest.raises(beir.BeirFormatError, match=r"train\.tsv: 1 training queries are judged in the evaluation"):
        beir.prepare_train_split(beir_folder, beir.TrainSplit(), eval_split="test", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_train_split_names_unknown_documents(beir_folder, tmp_path):
    _train_qrels(beir_folder, "q3\td9\t1\n")
    with pytest.raises(beir.BeirFormatError, match=r"train\.tsv: 1 positive document ids not in corpus\.jsonl"):
        beir.prepare_train_split(beir_folder, beir.TrainSplit(), eval_split="test", out_dir=tmp_path / "o")


def test_train_split_subsample_is_seeded(tmp_path):
    d = tmp_path / "big"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "text": "t{i}"}}\n' for i in range(30)))
    (d / "queries.jsonl").write_text("".join(f'{{"_id": "q{i}", "text": "x{i}"}}\n' for i in range(30)))
    (d / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(30))
    )
    runs = [
        beir.prepare_train_split(d, beir.TrainSplit(max_queries=5, seed=s), "test", tmp_path / f"o{s}{k}")
        for s, k in ((1, "a"), (1, "b"), (2, "a"))
    ]
    picked = [
        sorted(beir.load_queries(tmp_path / f"o{s}{k}" / "queries.jsonl")) for s, k in ((1, "a"), (1, "b"), (2, "a"))
    ]
    assert [r["queries"] for r in runs] == [5, 5, 5]
    assert picked[0] == picked[1] != picked[2]


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("corpus.jsonl", 2),
        ("queries.jsonl", 1),
        ("qrels/test.tsv", 3),
    ],
)
def test_bytes_that_are_not_utf8_name_file_and_line(beir_folder, name, line):
    path = beir_folder / name
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"d", b"\xe9d", 1)  # Latin-1 e-acute: invalid UTF-8
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(beir.BeirFormatError, match=rf"{name}:{line}: not UTF-8 \(byte 0xe9 at column \d+"):
        beir.load_dataset(beir_folder)


def test_empty_queries_file_is_named(beir_folder):
    (beir_folder / "queries.jsonl").write_text("")
    with pytest.raises(beir.BeirFormatError, match=r"queries\.jsonl: no queries"):
        beir.load_dataset(beir_folder, on_unknown="drop")


def test_a_query_with_an_empty_text_is_refused(beir_folder):
    with open(beir_folder / "queries.jsonl", "a") as f:
        f.write('{"_id": "q4", "text": "  "}\n')
    with pytest.raises(beir.BeirFormatError, match=r"queries\.jsonl:4: query 'q4' has an empty text"):
        beir.load_queries(beir_folder / "queries.jsonl")


def test_empty_documents_are_kept_and_counted(beir_folder, caplog):
    with open(beir_folder / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d4", "title": "", "text": ""}\n')
    corpus = beir.load_corpus(beir_folder / "corpus.jsonl")
    assert corpus.ids[-1] == "d4"
    assert any("1 documents have neither title nor text" in r.getMessage() for r in caplog.records)


def test_a_split_whose_judged_queries_are_all_unknown_is_an_error(beir_folder):
    (beir_folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(beir.BeirFormatError, match=r"test\.tsv: no query of split 'test' is left with a judgment"):
        beir.load_dataset(beir_folder, on_unknown="drop")


@pytest.mark.parametrize(
    ("name", "record", "line"),
    [
        ("corpus.jsonl", r'{"_id": "d4", "title": "\ud800", "text": "x"}', 4),
        ("corpus.jsonl", r'{"_id": "d4", "text": "lone low \udc00 half"}', 4),
        ("queries.jsonl", r'{"_id": "q4", "text": "cat \ud83d"}', 4),
        ("queries.jsonl", r'{"_id": "q\ud800", "text": "cat"}', 4),
    ],
)
def test_a_lone_surrogate_is_refused_with_file_and_line(beir_folder, tmp_path, name, record, line):
    """Issue 30, item 6: valid JSON, not Unicode text; writing the prepared copy would die
    with a bare UnicodeEncodeError naming no file."""
    with open(beir_folder / name, "a") as f:
        f.write(record + "\n")
    (beir_folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(beir.BeirFormatError, match=rf"{name}:{line}: .*lone surrogate"):
        ds = beir.load_dataset(beir_folder)
        beir.write_dataset(ds, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_surrogate_pair_is_one_character_and_passes(beir_folder):
    with open(beir_folder / "queries.jsonl", "a") as f:
        f.write(r'{"_id": "q4", "text": "cat \ud83d\ude00"}' + "\n")
    assert beir.load_queries(beir_folder / "queries.jsonl")["q4"] == "cat \U0001f600"
