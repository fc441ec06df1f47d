"""bench/compare_quality.py: the seed-noise tests behind "inside the noise" claims, pinned on hand-worked cases;
and the benchmarks' --seeds syntax."""
import math

import pytest
from scipy.stats import t

from bench.compare_quality import BARS, compare, difference_test, main


def t3_cdf(t: float) -> float:
    """Student's t CDF for 3 degrees of freedom in closed form, independent of scipy."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paired_difference_by_hand():
    # Differences 1, 2, 0, 2: mean 1.25, sd sqrt(2.75 / 3), t = 1.25 / (sd / 2) = 2.6112 on 3 degrees of freedom.
    r = difference_test([1, 2, 3, 4], [2, 4, 3, 6], paired=True)
    se = math.sqrt(2.75 / 3) / 2
    assert r["test"] == "paired"
    assert r["difference"] == pytest.approx(1.25)
    assert r["p"] == pytest.approx(2 * (1 - t3_cdf(1.25 / se)), abs=1e-9)
    assert r["p"] == pytest.approx(0.0797, abs=5e-4)
    half = 3.182446 * se  # t(0.975, 3) from a table
    assert r["ci95"] == pytest.approx([1.25 - half, 1.25 + half], abs=1e-5)


def test_one_sample_against_a_bar():
    # Mean .6 against .5: sd .2, se .2 / sqrt(3), t = .866 on 2 degrees of freedom; t(0.975, 2) = 4.302653.
    r = difference_test(0.5, [0.4, 0.6, 0.8])
    se = 0.2 / math.sqrt(3)
    assert (r["base"], r["test"]) == (0.5, "one-sample")
    assert r["other"] == pytest.approx(0.6) and r["difference"] == pytest.approx(0.1)
    assert r["ci95"] == pytest.approx([0.1 - 4.302653 * se, 0.1 + 4.302653 * se], abs=1e-5)
    # For 2 degrees of freedom the two-sided p is 1 - t / sqrt(2 + t^2).
    t = 0.1 / se
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)


def test_welch_when_seeds_differ():
    # Variances 1 and 4 over 3 each: se sqrt(5/3); Welch's degrees of freedom (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2).
    r = difference_test([1, 2, 3], [4, 6, 8])
    assert r["test"] == "welch" and r["difference"] == pytest.approx(4)
    df = (5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)
    assert df == pytest.approx(2.9412, abs=1e-4)
    se = math.sqrt(5 / 3)
    assert r["ci95"] == pytest.approx([4 - t.ppf(0.975, df) * se, 4 + t.ppf(0.975, df) * se])
    assert r["p"] == pytest.approx(2 * t.sf(4 / se, df))
    assert r["p"] == pytest.approx(0.055, abs=1e-3)  # 4 apart, sds 1 and 2, 3 samples each: not quite sure


def test_no_spread_gives_no_verdict():
    for r in (difference_test([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True),
              difference_test(0.99, [1.0, 1.0]), difference_test([0.9], [0.95])):
        assert math.isnan(r["p"]) and all(math.isnan(x) for x in r["ci95"])


def result(seeds, t2i_by_seed, bits="16"):
    per_seed = [{bits: {d: {"reference": v, "textbook": v - 0.01} for d, v in
                        (("I->T", 0.95), ("T->I", x), ("I->I", 0.93), ("T->T", 1.0))}} for x in t2i_by_seed]
    return {"seeds": seeds, "per_seed": per_seed, "per_seed_adaptive": per_seed}


def test_compare_pairs_same_seeds_and_reads_the_bar_of_its_code_length():
    a, b = result([0, 1, 2], [0.97, 0.98, 0.99]), result([0, 1, 2], [0.975, 0.986, 0.993])
    rows = compare(a, b)
    assert rows["16"]["T->I"]["test"] == "paired"
    assert rows["16"]["T->I"]["difference"] == pytest.approx(0.014 / 3)
    assert compare(a, result([3, 4, 5], [0.97, 0.98, 0.99]))["16"]["T->I"]["test"] == "welch"
    bar = compare(a, "straightforward", definition="textbook")["16"]["T->I"]
    assert bar["base"] == BARS["straightforward"]["T->I"][0]
    assert bar["other"] == pytest.approx(0.97)
    wide = compare(result([0, 1], [0.99, 0.995], bits="64"), "published")["64"]
    assert set(wide) == {"I->T", "T->I"} and wide["T->I"]["base"] == BARS["published"]["T->I"][2]


def test_cli_refuses_both_or_neither_and_unreadable_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not a readable result JSON"):
        main([str(bad), "--bar", "published"])
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "search_latency"}')
    with pytest.raises(SystemExit, match="not a bench/train_quality.py result"):
        main([str(other), "--bar", "published"])
    old = tmp_path / "old.json"
    old.write_text('{"seeds": [0], "per_seed": [{"16": {"T->I": {"reference": 0.9}}}]}')
    with pytest.raises(SystemExit, match="use --ties order"):
        main([str(old), "--bar", "published", "--ties", "adaptive"])


def test_seed_lists_and_ranges():
    from bench.common import parse_seeds

    assert parse_seeds("0") == [0]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-9") == list(range(10))
    assert parse_seeds("3-5,0") == [3, 4, 5, 0]
    for bad in ("", "a", "0-", "1,1", "2-1"):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)


def test_results_of_the_same_day_are_never_replaced(tmp_path, monkeypatch):
    import bench.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    first = common.save("kind", {"x": 1})
    second = common.save("kind", {"x": 2})
    assert first != second and second.name == first.name.replace(".json", "-2.json")
    assert '"x": 1' in first.read_text() and '"x": 2' in second.read_text()
    assert common.new_result_path("other").name == "other.json"
