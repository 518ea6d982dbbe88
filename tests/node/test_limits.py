"""The client limits' core (node/limits.py): plain calls, time moved by hand."""

from __future__ import annotations

from node.limits import CALM_MS, FrameRate, Verdict, must_pause

RATE_PER_S = 100
ABUSE_CLOSE_MS = 3000


def test_a_full_bucket_admits_one_burst_then_rejects():
    rate = FrameRate(RATE_PER_S, ABUSE_CLOSE_MS, now_ms=0)

    verdicts = [rate.frame(0) for _ in range(RATE_PER_S + 1)]

    assert verdicts[:RATE_PER_S] == [Verdict.ADMIT] * RATE_PER_S
    assert verdicts[-1] is Verdict.REJECT
    assert (rate.admitted_total, rate.rejected_total) == (RATE_PER_S, 1)


def test_tokens_come_back_at_the_configured_rate():
    rate = FrameRate(RATE_PER_S, ABUSE_CLOSE_MS, now_ms=0)
    for _ in range(RATE_PER_S):
        rate.frame(0)

    assert rate.frame(5) is Verdict.REJECT  # half a token
    assert rate.frame(10) is Verdict.ADMIT  # 10 ms at 100/s is one token
    assert rate.frame(10) is Verdict.REJECT


def test_a_client_refused_for_the_abuse_time_is_closed():
    rate = FrameRate(RATE_PER_S, ABUSE_CLOSE_MS, now_ms=0)
    for _ in range(RATE_PER_S):
        rate.frame(0)

    verdicts = {now: rate.frame(now) for now in range(0, ABUSE_CLOSE_MS + 1, 1)
                for _ in range(2)}

    assert verdicts[ABUSE_CLOSE_MS - 1] is not Verdict.CLOSE
    assert verdicts[ABUSE_CLOSE_MS] is Verdict.CLOSE


def test_a_client_that_calms_down_starts_a_new_abuse_timer():
    rate = FrameRate(RATE_PER_S, ABUSE_CLOSE_MS, now_ms=0)
    for _ in range(RATE_PER_S + 1):
        rate.frame(0)
    assert rate.statistics().over_since_ms == 0

    assert rate.frame(CALM_MS) is Verdict.ADMIT

    assert rate.statistics().over_since_ms is None
    for _ in range(RATE_PER_S):
        rate.frame(CALM_MS)
    assert rate.statistics().over_since_ms == CALM_MS


def test_a_clock_that_steps_back_never_adds_tokens():
    rate = FrameRate(RATE_PER_S, ABUSE_CLOSE_MS, now_ms=1000)
    for _ in range(RATE_PER_S):
        rate.frame(1000)

    assert rate.frame(0) is Verdict.REJECT
    assert rate.frame(1000) is Verdict.REJECT


def test_only_holders_at_or_above_the_mean_pause_and_only_when_full():
    total_max = 100

    assert not must_pause(90, 99, total_max, holders=2)
    assert must_pause(90, 100, total_max, holders=2)
    assert not must_pause(10, 100, total_max, holders=2)
    assert not must_pause(0, 100, total_max, holders=1)
    assert must_pause(100, 100, total_max, holders=1)


def test_wait_ms_is_zero_with_a_token_and_the_time_to_the_next_one_without():
    rate = FrameRate(rate_per_s=1000, abuse_close_ms=5000, now_ms=0, burst=1)

    assert rate.wait_ms(0) == 0
    assert rate.frame(0) is Verdict.ADMIT
    assert rate.wait_ms(0) == 1  # one token a millisecond
    slow = FrameRate(rate_per_s=4, abuse_close_ms=5000, now_ms=0, burst=1)
    slow.frame(0)
    assert slow.wait_ms(100) == 150
