"""llmctl dedup through the CLI and real pipelines: options, outputs, incremental index, bad input."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import read_jsonl, run_llmctl, shell, write_jsonl


def _corpus():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)]
    bases = [" ".join(rng.choices(vocab, k=80)) for _ in range(40)]
    records = [{"id": i, "text": t} for i, t in enumerate(bases)]
    for i in range(0, 40, 4):  # near copies: one word changed at the end
        words = bases[i].split()
        words[-1] = "changed"
        records.append({"id": 100 + i, "text": " ".join(words)})
    records.append({"id": 999, "text": bases[2].upper()})  # an exact copy after normalisation
    return records


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", _corpus())


def test_minhash_removes_near_copies_and_keeps_order_and_fields(cli, data):
    result = cli("dedup", data)
    assert result.exit_code == 0, result.stderr
    out = read_jsonl(result.stdout)
    assert [r["id"] for r in out] == list(range(40))
    assert "51 documents, 11 duplicates removed in 11 clusters, 40 kept" in result.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_kept_records_are_the_input_lines_byte_for_byte(cli, tmp_path, suffix):
    import gzip

    lines = [
        json.dumps(r, ensure_ascii=True, indent=None, separators=(", ", ": "))  # not llmctl's own style
        for r in [{"text": "caf\u00e9 " + t, "z": 1, "a": [1.50, None]} for t in ("one two", "three")]
    ]
    lines.insert(1, lines[0])  # an exact copy, removed
    body = "\r\n".join(lines) + "\r\n\n"  # CRLF endings and a blank line
    path = tmp_path / f"in{suffix}"
    path.write_bytes(gzip.compress(body.encode()) if suffix.endswith(".gz") else body.encode())
    result = cli("dedup", path, "--method", "exact", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.jsonl").read_text() == lines[0] + "\n" + lines[2] + "\n"


def test_mark_and_clusters_file_name_every_member(cli, data, tmp_path):
    clusters = tmp_path / "clusters.jsonl"
    result = cli("dedup", data, "--mark", "--clusters", clusters)
    assert result.exit_code == 0, result.stderr
    out = read_jsonl(result.stdout)
    assert len(out) == 51
    dup = {r["id"]: r["dup_cluster"] for r in out if r["is_duplicate"]}
    assert dup[104] == f"{data}:5" and dup[999] == f"{data}:3"
    assert all(r["dup_cluster"] is None for r in out if r["id"] in (1, 3))
    audit = read_jsonl(clusters.read_text())
    first = f"{data}:1"
    assert len(audit) == 11 and audit[0] == {
        "cluster": first, "size": 2, "kept": first, "members": [first, f"{data}:41"], "indexed": [],
    }  # fmt: skip


def test_exact_method_only_removes_exact_copies(cli, data):
    result = cli("dedup", data, "--method", "exact")
    assert [r["id"] for r in read_jsonl(result.stdout)] == list(range(40)) + [
        100 + i for i in range(0, 40, 4)
    ]


def test_json_summary_needs_an_output_file(cli, data, tmp_path):
    assert cli("dedup", data, "--json").exit_code == 2
    result = cli("dedup", data, "--json", "-o", tmp_path / "out.jsonl", "--verify-jaccard")
    summary = json.loads(result.stdout)
    assert summary["documents"] == 51 and summary["duplicates"] == 11 and summary["params"]["bands"] == 14


def test_output_is_identical_for_any_worker_count_through_a_pipeline(data):
    outputs = {shell(f"cat {data} | llmctl dedup --workers {w} --mark --quiet").stdout for w in (1, 2)}
    assert len(outputs) == 1 and len(read_jsonl(outputs.pop())) == 51


def test_index_deduplicates_a_new_batch_against_earlier_runs(cli, tmp_path):
    records = _corpus()
    first = write_jsonl(tmp_path / "first.jsonl", records[:40])
    second = write_jsonl(
        tmp_path / "second.jsonl", records[40:] + [{"id": 500, "text": "a brand new text " * 9}]
    )
    index = tmp_path / "index"
    assert cli("dedup", first, "--index", index).exit_code == 0
    result = cli("dedup", second, "--index", index, "--mark")
    assert result.exit_code == 0, result.stderr
    out = read_jsonl(result.stdout)
    assert [r["id"] for r in out if not r["is_duplicate"]] == [500]
    assert out[0]["dup_cluster"] == f"{first}:1"
    assert (index / "documents.txt").read_text().count("\n") == 52
    other = cli("dedup", second, "--index", index, "--threshold", "0.5")
    assert other.exit_code == 2 and "other parameters" in other.stderr


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "ok"', "data.jsonl:2: malformed JSON"),
        ('{"body": "x"}', "data.jsonl:2: missing field 'text'"),
        ('{"text": "   "}', "data.jsonl:2: field 'text' is empty"),
    ],
)
def test_bad_lines_exit_3_naming_the_line_or_are_skipped_and_counted(cli, tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one doc"}\n' + line + '\n{"text": "two doc"}\n')
    result = cli("dedup", path)
    assert result.exit_code == 3 and message in result.stderr
    assert result.stdout == ""  # nothing written before the whole input is known good
    result = cli("dedup", path, "--skip-bad-lines")
    assert result.exit_code == 0 and len(read_jsonl(result.stdout)) == 2
    assert "skipped 1 bad line" in result.stderr


def test_invalid_utf8_is_an_input_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    result = run_llmctl("dedup", path)
    assert result.returncode == 3 and b"bad.jsonl:2: invalid UTF-8" in result.stderr


def test_decontamination_removes_training_records_sharing_a_13_gram(cli, tmp_path):
    passage = "natalia sold clips to forty eight of her friends in april and then she sold half"
    evals = write_jsonl(tmp_path / "test.jsonl", [{"question": passage + " as many in may"}])
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "an unrelated record about cooking pasta with tomatoes"},
        {"text": "copied: " + passage.upper() + "!"},
        {"text": " ".join(passage.split()[:12]) + " only twelve words"},
    ])  # fmt: skip
    result = cli("dedup", train, "--against", evals, "--against-field", "question", "--mark")
    assert result.exit_code == 0, result.stderr
    assert [r["contaminated_by"] for r in read_jsonl(result.stdout)] == [[], [f"{evals}:1"], []]
    assert f"{evals}:1: 1 training document(s)" in result.stderr


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module (starting one takes seconds); dedup reuses it."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=200 * 1024**2)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("method", ["minhash", "exact"])
def test_ray_engine_gives_the_local_engines_records_marks_and_clusters(cli, data, tmp_path, local_ray,
                                                                      monkeypatch, method):  # fmt: skip
    from llmctl.core.dedup import ray_engine

    monkeypatch.setattr(ray_engine, "CHUNK_DOCS", 7)  # several Ray tasks for 51 documents
    outs = {}
    for engine in ("local", "ray"):
        clusters = tmp_path / f"clusters-{engine}.jsonl"
        result = cli("dedup", data, "--method", method, "--mark", "--clusters", clusters, "--engine", engine)
        assert result.exit_code == 0, result.stderr
        outs[engine] = (read_jsonl(result.stdout), read_jsonl(clusters.read_text()))
    assert outs["ray"] == outs["local"]
    assert sum(r["is_duplicate"] for r in outs["ray"][0]) == (11 if method == "minhash" else 1)
    assert local_ray.is_initialized()  # an existing Ray session is used, not shut down


def test_ray_engine_refuses_what_it_does_not_support(cli, data, tmp_path):
    result = cli("dedup", data, "--engine", "ray", "--verify-jaccard")
    assert result.exit_code == 2 and "--engine ray" in result.stderr


def test_options_that_do_not_go_together_are_usage_errors(cli, data, tmp_path):
    assert cli("dedup", data, "--method", "exact", "--verify-jaccard").exit_code == 2
    assert cli("dedup", data, "--index", tmp_path / "i", "--verify-jaccard").exit_code == 2
    assert cli("dedup", data, "--bands", "4").exit_code == 2  # --rows missing
    assert cli("dedup", data, "--bands", "20", "--rows", "10").exit_code == 2  # more than --num-perm
    assert cli("dedup", data, "--against", data, "--clusters", tmp_path / "c.jsonl").exit_code == 2


def test_ray_engine_starts_and_stops_its_own_local_cluster_quietly(data):
    pytest.importorskip("ray")
    local = run_llmctl("dedup", data)
    done = run_llmctl("dedup", data, "--engine", "ray", "--workers", "2", env={"RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == local.stdout
    lines = [x for x in done.stderr.decode().splitlines() if x.strip()]
    assert len(lines) == 1 and "51 documents, 11 duplicates removed" in lines[0], lines
