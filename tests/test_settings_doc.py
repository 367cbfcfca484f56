"""config/README.md's settings tables are the schema's (``python -m llmret.settings_doc``)."""

from __future__ import annotations

from llmret import plan, settings_doc


def test_readme_tables_are_current():
    _, stale = settings_doc.rewrite(settings_doc.README.read_text(encoding="utf-8"))
    assert not stale, f"config/README.md: stale settings tables {stale}: run python -m llmret.settings_doc"


def test_every_settings_dataclass_has_a_table():
    tables = set(settings_doc.entries(settings_doc.README.read_text(encoding="utf-8")))
    assert set(plan.SPEC_CLASSES) <= tables, sorted(set(plan.SPEC_CLASSES) - tables)


def test_a_row_says_type_default_bounds_and_description():
    rows = settings_doc.table("lora").splitlines()
    assert rows[0] == "| key | type | default | bounds / choices | description |"
    assert "| `r` | integer | `8` | >= 1 | Rank of the adapters |" in rows
    assert any(row.startswith("| `dropout` | number | `0.05` | in [0, 1) |") for row in rows)
    dense = settings_doc.table("systems.dense")
    assert "| `model` | string | required |" in dense  # required keys say so
    assert "`last`, `mean`" not in dense and "last\\|mean" in dense  # a pattern's | is escaped
    datasets = settings_doc.table("datasets")
    assert "| `subsample.seed` | integer | `13` |" in datasets  # nested objects key by key
    assert "id&lt;TAB>text" in datasets  # no stray HTML


def test_check_names_the_stale_table_and_the_rewrite_fixes_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = "intro\n\n<!-- settings:lora -->\nold table\n<!-- /settings:lora -->\n\nafter\n"
    readme.write_text(text)
    assert settings_doc.main(["--check", "--readme", str(readme)]) == 1
    assert "stale settings table(s): lora" in capsys.readouterr().err
    assert readme.read_text() == text  # --check changes nothing
    assert settings_doc.main(["--readme", str(readme)]) == 0
    assert settings_doc.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text().startswith("intro\n\n<!-- settings:lora -->\n\n| key |")
    assert readme.read_text().endswith("<!-- /settings:lora -->\n\nafter\n")


def test_a_marker_left_open_or_an_unknown_entry_is_an_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- settings:lora -->\nno end\n")
    assert settings_doc.main(["--check", "--readme", str(readme)]) == 2
    assert "without their closing marker: ['lora']" in capsys.readouterr().err
    readme.write_text("<!-- settings:nope -->\n<!-- /settings:nope -->\n")
    assert settings_doc.main(["--readme", str(readme)]) == 2
    assert "no entry 'nope'" in capsys.readouterr().err
