import pytest

from conftest import LONGEN
import json

from slkit.evaluation.benchmarks import (length_bin, length_stability, load_benchmark, load_longen, longbench_write_score, longen_interval, longen_score, stratified_subset, summarize_scores)
from slkit.core.records import RecordFileError
from slkit.stages.evaluation import score_benchmark


@pytest.mark.parametrize("kind,constraint,interval", [
    ("about", "around 2000 words", (1600, 2400)),
    ("about", "大约2500字", (2000, 3000)),
    ("range", "2000-3000 words", (2000, 3000)),
    ("range", "4000字至6000字", (4000, 6000)),
    ("above", "more than 4000 words", (4000, 6000)),
    ("above", "大于2000字", (2000, 3000)),
    ("below", "less than 3000 words", (1500, 3000)),
    ("below", "小于8000字", (4000, 8000)),
])
def test_intervals(kind, constraint, interval):
    assert longen_interval(kind, constraint) == pytest.approx(interval)


def test_scores_hand_computed_per_type():
    # about 2000 -> [1600, 2400]
    assert longen_score(2000, (1600, 2400)) == 1.0
    assert longen_score(1200, (1600, 2400)) == pytest.approx(2 * 1200 / 1600 - 1)  # 0.5
    assert longen_score(3000, (1600, 2400)) == pytest.approx(3 - 2 * 3000 / 2400)  # 0.5
    assert longen_score(700, (1600, 2400)) == 0.0
    # range 2000-3000
    assert longen_score(1500, (2000, 3000)) == pytest.approx(0.5)
    assert longen_score(4500, (2000, 3000)) == 0.0
    # above 4000 -> [4000, 6000]
    assert longen_score(3000, (4000, 6000)) == pytest.approx(0.5)
    assert longen_score(6600, (4000, 6000)) == pytest.approx(0.8)
    # below 3000 -> [1500, 3000]
    assert longen_score(1200, (1500, 3000)) == pytest.approx(0.6)
    assert longen_score(3300, (1500, 3000)) == pytest.approx(0.8)


def test_summary_per_type_language_and_overall():
    rows = [{"type": "about", "language": "en", "score": 1.0}, {"type": "about", "language": "zh", "score": 0.0},
            {"type": "below", "language": "en", "score": 0.5}]
    s = summarize_scores(rows)
    assert s["overall"] == 0.5 and s["per_type"] == {"about": 0.5, "below": 0.5}
    assert s["per_language"] == {"en": 0.75, "zh": 0.0} and s["n"] == 3


@pytest.mark.parametrize("produced,required,score", [
    (1000, 1000, 100.0),
    (2000, 1000, 100 * (1 - 1 / 3)),    # twice too long: 66.67
    (4000, 1000, 0.0),                  # y/x - 1 = 3: the floor
    (5000, 1000, 0.0),
    (500, 1000, 50.0),                  # half as long: 1 - (2 - 1)/2
    (250, 1000, 0.0),                   # a quarter: 1 - 3/2 < 0
    (800, 1000, 87.5),                  # 1 - (1.25 - 1)/2
    (0, 1000, 0.0),
])
def test_longbench_write_score_by_hand(produced, required, score):
    assert longbench_write_score(produced, required) == pytest.approx(score)


def test_length_bins_follow_longwriter():
    assert [length_bin(w) for w in (100, 499, 500, 1999, 2000, 3999, 4000, 20000)] == [
        "<500", "<500", "500-2k", "500-2k", "2k-4k", "2k-4k", ">=4k", ">=4k"]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def test_longbench_write_format_is_detected_and_normalised(tmp_path):
    f = _write(tmp_path / "lbw.jsonl", [{"prompt": "Write a 300-word note.", "type": "Other", "length": 300},
                                        {"prompt": "写一篇三千字的文章。", "type": "文学", "length": 3000}])
    fmt, items = load_benchmark(f)
    assert fmt == "longbench_write"
    assert [(i["language"], i["bin"], i["required"], i["type"]) for i in items] == [
        ("en", "<500", 300.0, "Other"), ("zh", "2k-4k", 3000.0, "文学")]


def test_longen_format_is_detected(tmp_path):
    f = _write(tmp_path / "lg.jsonl", [{"language": "en", "range": "2-4k", "type": "about",
                                        "constraint": "around 2000 words", "query": "q"}])
    fmt, [item] = load_benchmark(f)
    assert fmt == "longen" and item["interval"] == (1600, 2400) and item["required"] == 2000 and item["bin"] == "2-4k"


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "p", "type": "t"}', r"lbw.jsonl:3: missing field\(s\) length"),
    ('{"prompt": "p", "type": "t", "length": "long"}', r"lbw.jsonl:3: length must be a positive number"),
    ('{"prompt": "p", "type": "t", "length": 0}', r"lbw.jsonl:3: length must be a positive number"),
    ('{"prompt": "p", "type": ', r"lbw.jsonl:3: not valid JSON"),
])
def test_a_malformed_benchmark_line_names_file_and_line(tmp_path, bad_line, message):
    good = '{"prompt": "p", "type": "t", "length": 100}'
    f = _write(tmp_path / "lbw.jsonl", [good, "", bad_line])  # line 2 blank: numbers are file lines
    with pytest.raises(RecordFileError, match=message):
        load_benchmark(f)


def test_a_missing_benchmark_file_is_named(tmp_path):
    with pytest.raises(RecordFileError, match="no such benchmark file"):
        load_benchmark(str(tmp_path / "nope.jsonl"))


def test_summary_per_length_bin():
    rows = [{"type": "a", "language": "en", "bin": ">=4k", "score": 40.0},
            {"type": "a", "language": "en", "bin": "<500", "score": 100.0},
            {"type": "b", "language": "en", "bin": "<500", "score": 80.0}]
    assert summarize_scores(rows)["per_length_bin"] == {"<500": 90.0, ">=4k": 40.0}  # LongWriter's bin order


def test_length_stability_by_hand():
    rows = [{"index": 0, "type": "about", "words": 100}, {"index": 0, "type": "about", "words": 300},
            {"index": 1, "type": "below", "words": 200}, {"index": 1, "type": "below", "words": 200},
            {"index": 2, "type": "about", "words": 50}]  # one sample only: no spread to measure
    s = length_stability(rows)
    # query 0: mean 200, population sd 100 -> CV 0.5; query 1: CV 0
    assert s["per_query"] == {0: 0.5, 1: 0.0} and s["overall_cv"] == 0.25
    assert s["per_type_cv"] == {"about": 0.5, "below": 0.0} and s["queries"] == 2 and s["samples_per_query"] == 2
    assert length_stability([{"index": 0, "type": "about", "words": 10}]) is None


def test_broken_benchmark_line_names_file_and_line(tmp_path):
    f = tmp_path / "bench.jsonl"
    f.write_text('{"language": "en", "range": "2-4k", "type": "about", "constraint": "around 2000 words", "query": "q"}\n'
                 '{"language": "en", "range": "2-4k", "type": "about", "constraint": "lots of words", "query": "q"}\n')
    with pytest.raises(RecordFileError, match=r"bench.jsonl:2: constraint 'lots of words'"):
        load_longen(str(f))


def test_stratified_subset_covers_every_group():
    records = [{"language": lang, "type": t, "i": i} for lang in ("en", "zh")
               for t in ("about", "range", "above", "below") for i in range(5)]
    subset = stratified_subset(records, 8, seed=1)
    assert sorted((r["language"], r["type"]) for r in subset) == sorted({(r["language"], r["type"]) for r in records})
    assert subset == stratified_subset(records, 8, seed=1)


@pytest.mark.skipif(not LONGEN.exists(), reason="LonGen.jsonl is not next to the checkout (../shared/data)")
def test_real_longen_parses():
    records = load_longen(str(LONGEN))
    assert len(records) == 240
    assert {r["type"] for r in records} == {"about", "range", "above", "below"}


# Chinese with CJK punctuation and an English word joined to Han characters: slkit's counter takes both,
# LongWriter's (Han characters plus \b[a-zA-Z]+\b) neither.
CHINESE_OUTPUT = "我们使用Python编程。这是第二句，很好！"


def test_longwriter_and_slkit_counters_differ_on_chinese():
    from slkit.method.textstats import count_words, count_words_longwriter

    assert count_words(CHINESE_OUTPUT) == 17  # 13 Han + 3 CJK punctuation marks + "Python"
    assert count_words_longwriter(CHINESE_OUTPUT) == 13  # Han characters only
    assert count_words_longwriter("Write 3 short notes, mp3 aside.") == 4  # neither "3" nor "mp3" is a word there
    assert count_words("Write 3 short notes, mp3 aside.") == 6


@pytest.mark.parametrize("fmt,row,words", [
    ("longbench_write", {"prompt": "写一篇短文。", "type": "文学", "length": 13}, 13),
    ("longen", {"language": "zh", "range": "2-4k", "type": "about", "constraint": "大约13字", "query": "写一篇短文。"}, 17),
])
def test_benchmark_outputs_are_scored_with_their_formats_counter(tmp_path, monkeypatch, smoke_params, scripted_engine,
                                                                 fmt, row, words):

    bench = _write(tmp_path / "bench.jsonl", [row])
    params = smoke_params.model_copy(update={"evaluation": smoke_params.evaluation.model_copy(
        update={"benchmark": bench, "benchmark_format": fmt, "subset_size": 1, "samples_per_query": 1})})
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda *args: scripted_engine(lambda request: CHINESE_OUTPUT))
    summary = score_benchmark(params, {}, tmp_path, "evaluation")
    record = json.loads((tmp_path / "benchmark_outputs.jsonl").read_text())
    assert (record["words_slkit"], record["words_longwriter"]) == (17, 13)
    assert record["words"] == words and record["counter"] == {"longen": "slkit", "longbench_write": "longwriter"}[fmt]
    if fmt == "longbench_write":  # S_l of 13 words for 13 required: 100; slkit's 17 would give 89.7
        assert record["score"] == summary["overall"] == 100.0
    else:  # about 13 -> [10.4, 15.6]: 17 words is above it
        assert record["score"] == pytest.approx(3 - 2 * 17 / 15.6)


def test_the_builtin_benchmark_is_package_data_in_longen_format():
    from slkit.evaluation.benchmarks import locate_benchmark

    path = locate_benchmark("builtin:lengths-mini")
    assert path.endswith("slkit/evaluation/builtin/lengths-mini.jsonl")
    fmt, items = load_benchmark("builtin:lengths-mini")
    assert fmt == "longen" and len(items) == 48
    groups = {(i["language"], i["type"]) for i in items}
    assert groups == {(lang, t) for lang in ("en", "zh") for t in ("about", "range", "above", "below")}
    for item in items:  # every target is within what a small model writes, and the query states it
        low, high = item["interval"]
        assert 50 <= low <= high <= 1200, item
        assert all(str(n) in item["query"] for n in {int(low), int(high)} if item["type"] == "range"), item


def test_an_unknown_builtin_benchmark_names_the_known_ones():
    with pytest.raises(RecordFileError, match="builtin:lengths-mini"):
        load_benchmark("builtin:nope")


def test_a_hub_dataset_with_one_split_needs_no_split_name(monkeypatch):
    import datasets

    rows = [{"language": "en", "range": "2-4k", "type": "about", "constraint": "around 2000 words", "query": "q"}]
    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        table = datasets.Dataset.from_list(rows)
        return table if split else datasets.DatasetDict({"test": table})

    monkeypatch.setattr("slkit.evaluation.benchmarks.load_dataset", fake_load)
    fmt, items = load_benchmark("quanshr/LonGen")
    assert fmt == "longen" and items[0]["interval"] == (1600.0, 2400.0) and calls == [("quanshr/LonGen", None)]
    load_benchmark("quanshr/LonGen:test")
    assert calls[-1] == ("quanshr/LonGen", "test")


def test_a_hub_dataset_with_several_splits_asks_for_one(monkeypatch):
    import datasets

    table = datasets.Dataset.from_list([{"prompt": "p", "type": "t", "length": 100}])
    monkeypatch.setattr("slkit.evaluation.benchmarks.load_dataset", lambda name, split=None: datasets.DatasetDict({"train": table, "test": table}))
    with pytest.raises(RecordFileError, match="splits train, test; name one as org/bench:SPLIT"):
        load_benchmark("org/bench")
