import pytest

from conftest import LONGEN
from slkit.evaluation import load_longen, longen_interval, longen_score, stratified_subset, summarize_scores
from slkit.records import RecordFileError


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


def test_broken_benchmark_line_names_file_and_line(tmp_path):
    f = tmp_path / "bench.jsonl"
    f.write_text('{"language": "en", "range": "2-4k", "type": "about", "constraint": "around 2000 words", "query": "q"}\n'
                 '{"language": "en", "range": "2-4k", "type": "about", "constraint": "lots of words", "query": "q"}\n')
    with pytest.raises(RecordFileError, match=r"bench.jsonl: record 2: constraint 'lots of words'"):
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
