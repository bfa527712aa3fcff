"""llmctl filter through the CLI: rules named in the output, per-rule counts, YAML thresholds."""

from __future__ import annotations

import json

from tests.conftest import read_jsonl, write_jsonl

GOOD = """The old stone bridge crosses the river just below the mill, where the water runs fast in spring.
Every Saturday the market fills the square with farmers selling cheese, bread and early vegetables.
Children walk to the school on the hill, and their teacher rings a brass bell at eight o'clock sharp.
In winter the harbour freezes for a few weeks, so the fishing boats are pulled up onto the beach.
Visitors often ask about the ruined castle, which was abandoned after a fire in the last century.
The library keeps a small museum with maps, letters and photographs that describe that history."""


def test_filter_keeps_good_text_and_names_the_rule_that_removes_each_document(cli, tmp_path):
    data = write_jsonl(tmp_path / "web.jsonl", [
        {"id": 1, "text": GOOD},
        {"id": 2, "text": "too short"},
        {"id": 3, "text": GOOD + "\nfunction() { return 1; }."},
    ])  # fmt: skip
    result = cli("filter", data, "--mark")
    assert result.exit_code == 0, result.stderr
    assert [r["filter_reason"] for r in read_jsonl(result.stdout)] == [
        None, "gopher-quality:min_doc_words", "c4:curly_bracket",
    ]  # fmt: skip
    assert (
        "gopher-quality: 1 (min_doc_words 1)" in result.stderr and "c4: 1 (curly_bracket 1)" in result.stderr
    )
    kept = read_jsonl(cli("filter", data).stdout)
    assert [r["id"] for r in kept] == [1]


def test_thresholds_file_overrides_a_rule_parameter(cli, tmp_path):
    data = write_jsonl(tmp_path / "web.jsonl", [{"text": "too short"}])
    (tmp_path / "rules.yaml").write_text("gopher-quality:\n  min_doc_words: 1\n  min_stop_words: 0\n")
    result = cli("filter", data, "--rules", "gopher-quality", "--thresholds", tmp_path / "rules.yaml")
    assert result.exit_code == 0 and len(read_jsonl(result.stdout)) == 1
    (tmp_path / "bad.yaml").write_text("gopher-quality:\n  min_words: 1\n")
    result = cli("filter", data, "--thresholds", tmp_path / "bad.yaml")
    assert result.exit_code == 2 and "unknown parameter(s) min_words" in result.stderr


def test_lang_field_removes_other_languages_and_json_reports_counts(cli, tmp_path):
    data = write_jsonl(tmp_path / "web.jsonl", [{"lang": "en", "text": GOOD}, {"lang": "fr", "text": GOOD}])
    result = cli("filter", data, "--lang-field", "lang", "--json", "-o", tmp_path / "out.jsonl")
    summary = json.loads(result.stdout)
    assert summary["kept"] == 1 and summary["removed"] == {"language": 1}


def test_unknown_rule_is_a_usage_error_and_missing_field_an_input_error(cli, tmp_path):
    data = write_jsonl(tmp_path / "web.jsonl", [{"body": GOOD}])
    assert cli("filter", data, "--rules", "gopher,c4").exit_code == 2
    result = cli("filter", data)
    assert result.exit_code == 3 and "web.jsonl:1: missing field 'text'" in result.stderr
