"""kill -9 under unthrottled load into ClickHouse: afterwards every rollup and every FinOps
answer equals the raw events (the long run: `python bench/kill_soak.py`)."""

from bench.kill_soak import soak


def test_after_repeated_kill_9_under_load_every_finops_answer_equals_the_raw_events(tmp_path):
    # (batches of 100: as unthrottled, and the backlog left to drain and check after the
    # last kill is 150,000 events or so rather than 400,000)
    result = soak(tmp_path, kills=6, kill_every=(0.8, 1.6), senders=3, batch=100)
    assert result.stored == result.sent > 0
    assert result.miscounted_hours == []
    assert result.differing_answers == []
