"""Budget periods: calendar windows in the org's time zone, exact across DST and month ends."""

from datetime import UTC, datetime, timedelta

import pytest

from billing.budget_periods import LIFETIME_START, budget_window

US = timedelta(microseconds=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_daily_period_runs_from_local_midnight_to_the_next() -> None:
    window = budget_window("daily", "Asia/Tokyo", utc(2025, 6, 10, 15, 0))  # 00:00 on the 11th
    assert window.period_id == "d2025-06-11"
    assert (window.start_at, window.end_at) == (utc(2025, 6, 10, 15), utc(2025, 6, 11, 15))


def test_the_period_changes_exactly_at_local_midnight() -> None:
    midnight = utc(2025, 6, 10, 22)  # Europe/Berlin, summer time (+02:00)
    before = budget_window("daily", "Europe/Berlin", midnight - US)
    at = budget_window("daily", "Europe/Berlin", midnight)
    assert before.period_id == "d2025-06-10" and before.end_at == midnight
    assert at.period_id == "d2025-06-11" and at.start_at == midnight
    assert before.contains(midnight - US) and not before.contains(midnight)
    assert at.contains(midnight)


@pytest.mark.parametrize(
    ("day", "start", "end", "hours"),
    [
        # Spring forward at 02:00: the day has 23 hours.
        ("2025-03-30", utc(2025, 3, 29, 23), utc(2025, 3, 30, 22), 23),
        # Fall back at 03:00: the day has 25 hours.
        ("2025-10-26", utc(2025, 10, 25, 22), utc(2025, 10, 26, 23), 25),
    ],
)
def test_daily_periods_follow_dst_changes(
    day: str, start: datetime, end: datetime, hours: int
) -> None:
    window = budget_window("daily", "Europe/Berlin", start + timedelta(hours=12))
    assert window.period_id == f"d{day}"
    assert (window.start_at, window.end_at) == (start, end)
    assert window.end_at - window.start_at == timedelta(hours=hours)


def test_a_midnight_skipped_by_dst_starts_the_day_at_the_transition() -> None:
    # America/Santiago jumps from 00:00 (-04) to 01:00 (-03) on 2024-09-08.
    window = budget_window("daily", "America/Santiago", utc(2024, 9, 8, 4, 30))
    assert window.period_id == "d2024-09-08"
    assert window.start_at == utc(2024, 9, 8, 4)  # the first instant of the local day
    assert window.end_at == utc(2024, 9, 9, 3)  # next midnight, at -03
    previous = budget_window("daily", "America/Santiago", utc(2024, 9, 8, 4) - US)
    assert previous.period_id == "d2024-09-07" and previous.end_at == window.start_at


def test_a_repeated_hour_before_midnight_stays_in_the_old_day() -> None:
    # America/Santiago falls back from 00:00 (-03) to 23:00 (-04) on 2024-04-07.
    second_2330 = utc(2024, 4, 7, 3, 30)  # 23:30 at -04, the second time round
    window = budget_window("daily", "America/Santiago", second_2330)
    assert window.period_id == "d2024-04-06"
    assert (window.start_at, window.end_at) == (utc(2024, 4, 6, 3), utc(2024, 4, 7, 4))


def test_a_repeated_midnight_starts_the_day_at_its_first_occurrence() -> None:
    # America/Havana falls back from 01:00 to 00:00 on 2024-11-03: midnight happens twice.
    window = budget_window("daily", "America/Havana", utc(2024, 11, 3, 5, 30))  # second 00:30
    assert window.period_id == "d2024-11-03"
    assert window.start_at == utc(2024, 11, 3, 4)


def test_weeks_start_on_monday_local_midnight_with_iso_week_ids() -> None:
    # Sunday 2025-01-05 23:59 in New York is in ISO week 2025-W01 (from Monday 2024-12-30).
    window = budget_window("weekly", "America/New_York", utc(2025, 1, 6, 4, 59))
    assert window.period_id == "w2025-W01"
    assert (window.start_at, window.end_at) == (utc(2024, 12, 30, 5), utc(2025, 1, 6, 5))
    following = budget_window("weekly", "America/New_York", utc(2025, 1, 6, 5))
    assert following.period_id == "w2025-W02" and following.start_at == window.end_at


def test_a_week_across_a_dst_change_is_an_hour_short() -> None:
    window = budget_window("weekly", "America/New_York", utc(2025, 3, 12))
    assert window.period_id == "w2025-W11"
    assert (window.start_at, window.end_at) == (utc(2025, 3, 10, 4), utc(2025, 3, 17, 4))
    spring = budget_window("weekly", "America/New_York", utc(2025, 3, 5))
    assert spring.end_at - spring.start_at == timedelta(days=7, hours=-1)


@pytest.mark.parametrize(
    ("instant", "zone", "period_id", "start", "end"),
    [
        # Still January in UTC, already February in Tokyo.
        (utc(2025, 1, 31, 16), "Asia/Tokyo", "m2025-02",
         utc(2025, 1, 31, 15), utc(2025, 2, 28, 15)),
        # A leap February.
        (utc(2024, 2, 29, 12), "UTC", "m2024-02", utc(2024, 2, 1), utc(2024, 3, 1)),
        # December rolls over into the next year.
        (utc(2025, 12, 31, 23, 59), "UTC", "m2025-12", utc(2025, 12, 1), utc(2026, 1, 1)),
        # Still December in Los Angeles on New Year's morning in UTC.
        (utc(2026, 1, 1, 7, 59), "America/Los_Angeles", "m2025-12",
         utc(2025, 12, 1, 8), utc(2026, 1, 1, 8)),
        # March in Berlin starts in winter time and ends in summer time.
        (utc(2025, 3, 15), "Europe/Berlin", "m2025-03", utc(2025, 2, 28, 23), utc(2025, 3, 31, 22)),
    ],
)  # fmt: skip
def test_months_start_on_the_local_first(
    instant: datetime, zone: str, period_id: str, start: datetime, end: datetime
) -> None:
    window = budget_window("monthly", zone, instant)
    assert (window.period_id, window.start_at, window.end_at) == (period_id, start, end)


def test_the_month_changes_exactly_at_the_local_first() -> None:
    first = utc(2025, 4, 30, 22)  # 2025-05-01 00:00 in Berlin
    assert budget_window("monthly", "Europe/Berlin", first - US).period_id == "m2025-04"
    assert budget_window("monthly", "Europe/Berlin", first).period_id == "m2025-05"


def test_lifetime_never_ends_and_has_one_id() -> None:
    early = budget_window("lifetime", "Asia/Tokyo", utc(1999, 1, 1))
    late = budget_window("lifetime", "UTC", utc(2090, 1, 1))
    assert early == late
    assert (early.period_id, early.start_at, early.end_at) == ("lifetime", LIFETIME_START, None)
    assert early.contains(utc(2090, 1, 1))


def test_naive_instants_and_unknown_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        budget_window("daily", "UTC", datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="Unknown budget period"):
        budget_window("hourly", "UTC", utc(2025, 1, 1))
