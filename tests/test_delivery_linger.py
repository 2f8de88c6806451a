"""How long the deliverer waits for a fuller write while an import is being embedded: Label Studio's cost per
request grows with the project's size (bench/RESULTS.md), so the wait grows with what its last write took."""

from __future__ import annotations

from common.delivery import Delivery
from worker.delivery import MAX_LINGER, linger_for

PID = 31


def test_the_setting_is_the_least_wait_and_zero_turns_it_off():
    assert linger_for(5.0, 0.0) == 5.0
    assert linger_for(5.0, 0.2) == 5.0
    assert linger_for(0.0, 30.0) == 0.0


def test_a_slow_write_makes_the_next_partial_one_wait_ten_times_as_long_within_a_minute():
    assert linger_for(5.0, 2.0) == 20.0
    assert linger_for(5.0, 30.0) == MAX_LINGER == 60.0


def test_the_last_write_time_is_kept_per_project_and_a_success_ends_the_backoff(clean_redis):
    outbox = Delivery(clean_redis)
    assert outbox.last_write_seconds(PID) == 0.0
    assert outbox.failed_attempt(PID) == 1
    outbox.succeeded(PID, 4.25)
    assert outbox.last_write_seconds(PID) == 4.25 and outbox.last_write_seconds(PID + 1) == 0.0
    assert outbox.failed_attempt(PID) == 1
