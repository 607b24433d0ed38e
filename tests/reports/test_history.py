"""The history: storage in SQLite, series per case, and change-point detection on
synthetic series with a known answer (a step, a creep, flat noise, an improvement).

`PYTHONPATH=. python tests/reports/test_history.py` prints the detection table quoted in the
README ("History"); the tests below assert the same counts' bounds."""

import itertools
import math
import random
import sqlite3

import pytest

from infermatrix.errors import UserError
from infermatrix.reports import history
from infermatrix.reports.history import Point, Series, judge, partition, segment
from infermatrix.reports.history_html import render_history_html
from infermatrix.reports.record import Record

SEEDS = range(200)

# ------------------------------------------------------------------ synthetic series


def noisy(levels: list[float], noise: float, seed: int) -> list[float]:
    """Each level times (1 + gaussian noise of relative sd `noise`)."""
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, noise)) for level in levels]


def step(size: float, n: int = 30, at: int = 15) -> list[float]:
    return [10.0] * at + [10.0 * (1 + size)] * (n - at)


def creep(per_commit: float = 0.03, commits: int = 10, flat: int = 10) -> list[float]:
    """`flat` commits at one level, then `commits` commits each per_commit slower."""
    return [10.0] * flat + [10.0 * (1 + per_commit) ** (i + 1) for i in range(commits)]


def outlier(seed: int) -> list[float]:
    """Flat noise with one lucky commit in the middle, 15% faster."""
    values = noisy([10.0] * 30, 0.02, seed)
    values[12] *= 0.85
    return values


def as_series(values: list[float], metric: str = "latency_ms_p50") -> Series:
    points = [Point(f"{i:040x}", f"2026-01-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00", v, 1)
              for i, v in enumerate(values)]
    return Series("case", "host", metric, points)


SCENARIOS = {  # name -> (values of a seed, what a correct check says: regression or not)
    "step +10% at commit 15 of 30, 2% noise": (lambda seed: noisy(step(0.10), 0.02, seed), True),
    "step +15% at the newest of 30 commits, 2% noise": (lambda seed: noisy(step(0.15, at=29), 0.02, seed), True),
    "creep 3%/commit x 10 after 10 flat, no noise": (lambda seed: creep(), True),
    "creep 3%/commit x 10 after 10 flat, 1% noise": (lambda seed: noisy(creep(), 0.01, seed), True),
    "creep 3%/commit x 10 after 10 flat, 2% noise": (lambda seed: noisy(creep(), 0.02, seed), True),
    "creep 3%/commit x 10 alone, 1% noise": (lambda seed: noisy(creep(flat=0), 0.01, seed), True),
    "flat, 30 commits, 2% noise": (lambda seed: noisy([10.0] * 30, 0.02, seed), False),
    "flat, 100 commits, 2% noise": (lambda seed: noisy([10.0] * 100, 0.02, seed), False),
    "flat, 10 commits, 2% noise": (lambda seed: noisy([10.0] * 10, 0.02, seed), False),
    "flat, 30 commits, 2% noise, one commit 15% faster": (outlier, False),
    "improvement -10% at commit 15 of 30, 2% noise": (lambda seed: noisy(step(-0.10), 0.02, seed), False),
}


def detection_counts(make, seeds=SEEDS) -> tuple[int, int]:
    """(series judged a regression, series with at least one change point) over the seeds."""
    verdicts = [judge(as_series(make(seed))) for seed in seeds]
    return sum(v.regression for v in verdicts), sum(bool(v.steps) for v in verdicts)


# ------------------------------------------------------------------ detection


def test_a_step_is_found_at_its_commit():
    v = judge(as_series(noisy(step(0.10), 0.02, seed=1)))
    assert v.regression
    assert [s.index for s in v.steps] == [15]
    assert v.steps[0].kind == "regression"
    assert v.change == pytest.approx(0.10, abs=0.02)


def test_a_creep_is_a_regression_though_no_commit_is_a_step():
    values = creep()
    assert max(b / a - 1 for a, b in zip(values, values[1:])) < 0.031  # each commit: 3%, under the threshold
    v = judge(as_series(values))
    assert v.regression
    assert v.best.start == 0 and v.latest.end == 20
    assert v.change > 0.15  # the newest level (a mean over the creep's later commits) against the flat one



@pytest.mark.parametrize("name", [n for n, (_, regression) in SCENARIOS.items() if regression])
def test_regressions_are_found_for_every_seed(name):
    make, _ = SCENARIOS[name]
    found, _ = detection_counts(make, range(50))
    if "newest" in name:  # one commit: its own noise and the noise estimate decide; the next commit confirms
        assert found >= 45
    else:
        assert found == 50


@pytest.mark.parametrize("name", [n for n, (_, regression) in SCENARIOS.items() if not regression])
def test_no_regression_is_reported_on_flat_noise_or_an_improvement(name):
    make, _ = SCENARIOS[name]
    found, _ = detection_counts(make)
    assert found == 0


def test_flat_noise_rarely_gets_a_change_point():
    _, with_steps = detection_counts(SCENARIOS["flat, 30 commits, 2% noise"][0])
    assert with_steps <= len(SEEDS) * 0.05


def test_an_improvement_is_a_step_of_its_own_kind():
    v = judge(as_series(noisy(step(-0.10), 0.02, seed=3)))
    assert not v.regression
    assert [s.kind for s in v.steps] == ["improvement"]


def test_direction_comes_from_the_metric():
    drop = step(-0.10)
    assert judge(as_series(drop, "tokens_per_s")).regression  # less throughput is worse
    assert not judge(as_series(drop, "latency_ms_p50")).regression
    assert not judge(as_series(step(0.10), "tokens_per_s")).regression


def test_a_step_undone_later_is_listed_but_not_a_regression():
    values = [10.0] * 10 + [12.0] * 10 + [10.0] * 10
    v = judge(as_series(values))
    assert [(s.index, s.kind) for s in v.steps] == [(10, "regression"), (20, "improvement")]
    assert not v.regression


def test_a_regression_after_an_improvement_counts_from_the_best_level():
    values = [10.0] * 10 + [8.0] * 10 + [10.0] * 10  # back where it began, but 25% worse than the best
    v = judge(as_series(values))
    assert v.regression and v.change == pytest.approx(0.25)


def test_a_step_within_the_threshold_is_small():
    v = judge(as_series(noisy(step(0.03), 0.002, seed=0)))
    assert [s.kind for s in v.steps] == ["small"]
    assert not v.regression
    assert judge(as_series(noisy(step(0.03), 0.002, seed=0)), threshold=0.02).regression


def test_short_and_nonpositive_series_are_skipped_with_the_reason():
    assert "at least 4" in judge(as_series([10.0, 20.0, 30.0])).skipped
    assert "<= 0" in judge(as_series([1.0, 0.0, 1.0, 1.0])).skipped


def test_a_metric_without_a_direction_is_refused():
    with pytest.raises(UserError, match="--metric flops has no better direction"):
        judge(as_series([1.0] * 5, "flops"))


def brute_force(xs, penalty):
    """The exact minimum of squared error + penalty per segment, over every partition."""
    def sse(part):
        mean = sum(part) / len(part)
        return sum((x - mean) ** 2 for x in part)

    best = math.inf
    for k in range(len(xs)):
        for cuts in itertools.combinations(range(1, len(xs)), k):
            bounds = [0, *cuts, len(xs)]
            best = min(best, sum(sse(xs[a:b]) for a, b in zip(bounds, bounds[1:])) + penalty * (k + 1))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_pruned_partition_is_optimal(seed):
    rng = random.Random(seed)
    xs = [rng.choice([0.0, 1.0, 3.0]) + rng.gauss(0, 0.3) for _ in range(rng.randint(1, 9))]
    penalty = rng.uniform(0.05, 2.0)
    ends = partition(xs, penalty)
    bounds = [0, *ends]
    cost = sum(sum((x - sum(xs[a:b]) / (b - a)) ** 2 for x in xs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert cost + penalty * len(ends) == pytest.approx(brute_force(xs, penalty))


def test_identical_values_are_one_level():
    assert segment([5.0] * 12) == [history.Segment(0, 12, pytest.approx(5.0))]


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("2.5", 0.025), (" 10% ", 0.10)])
def test_threshold_parses(text, value):
    assert history.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "0%", "-5%", "nan", ""])
def test_bad_threshold_is_refused(text):
    with pytest.raises(UserError, match="--threshold .* write it like 5%"):
        history.parse_threshold(text)


# ------------------------------------------------------------------ storage and series


def record(case_id="m/v/prefill/float32/cpu/b1-p32", sha="a" * 40, date="2026-01-01T00:00:00+00:00", value=10.0,
           host="ci", status="ok"):
    return Record(case_id=case_id, case={"model": "m"}, status=status, metrics={"latency_ms_p50": value},
                  env={"git_sha": sha, "host": host}, started_at=date)


def test_adding_a_run_twice_stores_it_once(tmp_path):
    db = tmp_path / "h.sqlite"
    records = [record(), record(case_id="other")]
    with history.open_db(db, create=True) as conn:
        assert history.add_records(conn, records, "run").new == 2
        again = history.add_records(conn, records, "run")
        assert (again.new, again.known) == (0, 2)
        assert len(history.stored_records(conn)) == 2
    conn.close()


def test_series_are_per_case_and_host_and_a_commit_is_the_median_of_its_runs():
    records = [record(value=10.0), record(date="2026-01-01T01:00:00+00:00", value=14.0),
               record(date="2026-01-01T02:00:00+00:00", value=11.0),
               record(sha="b" * 40, date="2026-01-02T00:00:00+00:00", value=20.0),
               record(sha="c" * 40, date="2026-01-01T12:00:00+00:00", value=99.0, host="laptop"),
               record(sha="d" * 40, date="2026-01-03T00:00:00+00:00", status="failed")]
    series = history.load_series(records, "latency_ms_p50")
    assert [(s.host, [(p.label, p.value, p.runs) for p in s.points]) for s in series] == [
        ("ci", [("aaaaaaa", 11.0, 3), ("bbbbbbb", 20.0, 1)]),
        ("laptop", [("ccccccc", 99.0, 1)]),
    ]


def test_runs_without_a_sha_are_points_at_their_dates():
    records = [record(sha=None, date="2026-01-02T00:00:00+00:00", value=2.0),
               record(sha="", date="2026-01-01T00:00:00+00:00", value=1.0)]
    points = history.load_series(records, "latency_ms_p50")[0].points
    assert [(p.sha, p.label, p.value) for p in points] == [("", "2026-01-01 00:00", 1.0), ("", "2026-01-02 00:00", 2.0)]


def test_bad_case_glob_and_metric_are_refused_naming_what_exists():
    with pytest.raises(UserError, match="--case 'nope' matches none of the 1 stored cases, e.g. m/v/prefill"):
        history.load_series([record()], "latency_ms_p50", "nope")
    with pytest.raises(UserError, match="--metric tokens_per_s: .* stored metrics include latency_ms_p50"):
        history.load_series([record()], "tokens_per_s")


def test_a_database_of_another_schema_version_is_refused(tmp_path):
    db = tmp_path / "h.sqlite"
    history.open_db(db, create=True).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    for create in (True, False):
        with pytest.raises(UserError, match=f"{db} is a history database of schema version 2; .* reads version 1: "
                                            "pass --db with a new file"):
            history.open_db(db, create=create)


def test_files_that_are_not_a_history_are_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all, just some text that is long enough" * 20)
    with pytest.raises(UserError, match="is not a SQLite database"):
        history.open_db(text, create=True)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(UserError, match="not an infermatrix history"):
        history.open_db(other, create=False)
    with pytest.raises(UserError, match="does not exist; start the history with `infermatrix history add"):
        history.open_db(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


# ------------------------------------------------------------------ html


def test_the_page_marks_change_points_escapes_records_and_fetches_nothing():
    hostile = as_series(step(0.2, n=12, at=6))
    hostile.case_id = '<script>alert(1)</script>"'
    page = render_history_html([judge(hostile), judge(as_series([10.0] * 3))], metric="latency_ms_p50",
                               threshold=0.05, source="h.sqlite")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in page
    assert "http" not in page.replace('http-equiv="Content-Security-Policy"', "") and "src=" not in page
    assert page.count('<svg class="chart"') == 2
    assert page.count('class="change" data-kind="regression"') == 1
    assert 'data-verdict="regression"' in page and 'data-verdict="skipped"' in page
    assert ">0000000<" in page  # the x axis: short SHAs


if __name__ == "__main__":  # the README's detection table
    seeds = range(1000)
    print(f"| series ({len(seeds)} seeds each, threshold 5%) | judged a regression | with a change point |")
    print("|---|---|---|")
    for name, (make, _) in SCENARIOS.items():
        runs = range(1) if "no noise" in name else seeds
        found, with_steps = detection_counts(make, runs)
        print(f"| {name} | {found} of {len(runs)} | {with_steps} of {len(runs)} |")
