"""Where rates meet token counts: exact nano-USD costs, and which price row applies."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import count

import pytest

from billing.contracts import PriceRates, TokenUsage
from billing.pricing import cost_nanos, price_pick, usd_exact

JAN_1 = datetime(2025, 1, 1, tzinfo=UTC)
ORG_ID = 7
OTHER_ORG_ID = 8
_price_ids = count(1)


def rates(
    input_usd: str = "1",
    output_usd: str = "2",
    *,
    cached_usd: str | None = None,
    reasoning_usd: str | None = None,
    org_id: int | None = None,
    effective_from: datetime = JAN_1,
    effective_until: datetime | None = None,
) -> PriceRates:
    """A price row in USD per million tokens."""
    return PriceRates(
        price_id=next(_price_ids),
        org_id=org_id,
        provider_kind="openai",
        model="gpt-test",
        input_usd_per_mtok=Decimal(input_usd),
        output_usd_per_mtok=Decimal(output_usd),
        cached_input_usd_per_mtok=None if cached_usd is None else Decimal(cached_usd),
        reasoning_usd_per_mtok=None if reasoning_usd is None else Decimal(reasoning_usd),
        effective_from=effective_from,
        effective_until=effective_until,
    )


# ---------------------------------------------------------------- cost_nanos


@pytest.mark.parametrize(
    ("usage", "price", "expected_nanos"),
    [
        pytest.param(TokenUsage(input_tokens=1_000), rates("0.15"), 150_000, id="1k-in-at-0.15"),
        pytest.param(TokenUsage(input_tokens=1), rates("0.075"), 75, id="1-in-at-0.075"),
        pytest.param(TokenUsage(output_tokens=1), rates("0", "0.6"), 600, id="1-out-at-0.60"),
        pytest.param(
            TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000),
            rates("2.50", "10"),
            12_500_000_000,
            id="1M-each-is-12.50-usd",
        ),
        pytest.param(TokenUsage(), rates("5", "15"), 0, id="no-tokens-cost-nothing"),
        pytest.param(
            TokenUsage(input_tokens=10**12, output_tokens=10**12),
            rates("123.456789", "987.654321"),
            1_111_111_110 * 10**9,
            id="huge-counts-stay-exact",
        ),
    ],
)
def test_cost_is_exact_integer_nanos(
    usage: TokenUsage, price: PriceRates, expected_nanos: int
) -> None:
    result = cost_nanos(usage=usage, rates=price)

    assert result == expected_nanos
    assert type(result) is int


@pytest.mark.parametrize(
    ("input_usd", "expected_nanos"),
    [
        pytest.param("0.000400", 0, id="0.4-rounds-down"),
        pytest.param("0.000500", 1, id="0.5-rounds-up"),
        pytest.param("0.001500", 2, id="1.5-rounds-up"),
        pytest.param("0.002500", 3, id="2.5-rounds-up-not-to-even"),
        pytest.param("0.002499", 2, id="2.499-rounds-down"),
    ],
)
def test_cost_rounds_half_up_to_a_whole_nano(input_usd: str, expected_nanos: int) -> None:
    assert cost_nanos(usage=TokenUsage(input_tokens=1), rates=rates(input_usd)) == expected_nanos


def test_cost_is_rounded_once_for_the_whole_request_not_per_part() -> None:
    """0.5 nano of input plus 0.5 nano of output is 1 nano, not 2."""
    usage = TokenUsage(input_tokens=1, output_tokens=1)

    assert cost_nanos(usage=usage, rates=rates("0.0005", "0.0005")) == 1


def test_cached_input_tokens_are_priced_at_the_cached_rate() -> None:
    usage = TokenUsage(input_tokens=1_000, cached_input_tokens=400)

    # 600 fresh at $1/M (1,000 nanos each) + 400 cached at $0.10/M (100 nanos each).
    assert cost_nanos(usage=usage, rates=rates("1", cached_usd="0.10")) == 640_000


def test_reasoning_tokens_are_priced_at_the_reasoning_rate() -> None:
    usage = TokenUsage(output_tokens=500, reasoning_tokens=200)

    # 300 visible at $2/M + 200 reasoning at $4/M.
    assert cost_nanos(usage=usage, rates=rates("1", "2", reasoning_usd="4")) == 1_400_000


def test_missing_cached_and_reasoning_rates_fall_back_to_input_and_output_rates() -> None:
    usage = TokenUsage(
        input_tokens=1_000, cached_input_tokens=400, output_tokens=500, reasoning_tokens=200
    )

    assert cost_nanos(usage=usage, rates=rates("1", "2")) == 1_000 * 1_000 + 500 * 2_000


def test_free_cached_rate_is_not_mistaken_for_a_missing_one() -> None:
    usage = TokenUsage(input_tokens=1_000, cached_input_tokens=1_000)

    assert cost_nanos(usage=usage, rates=rates("1", cached_usd="0")) == 0


@pytest.mark.parametrize(
    ("usage", "expected_nanos"),
    [
        # Only 100 input tokens exist, so at most 100 are cached: 100 at $0.50/M.
        pytest.param(TokenUsage(input_tokens=100, cached_input_tokens=500), 50_000, id="cached"),
        # Only 100 output tokens exist, so at most 100 are reasoning: 100 at $4/M.
        pytest.param(TokenUsage(output_tokens=100, reasoning_tokens=500), 400_000, id="reasoning"),
    ],
)
def test_cached_and_reasoning_counts_are_capped_by_their_totals(
    usage: TokenUsage, expected_nanos: int
) -> None:
    price = rates("1", "2", cached_usd="0.50", reasoning_usd="4")

    assert cost_nanos(usage=usage, rates=price) == expected_nanos


# ---------------------------------------------------------------- price_pick

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_org_override_beats_the_list_price() -> None:
    list_price = rates("1", effective_from=JAN_1 + timedelta(days=30))
    override = rates("0.5", org_id=ORG_ID)

    assert price_pick([list_price, override], org_id=ORG_ID, moment=NOW) == override
    assert price_pick([override, list_price], org_id=ORG_ID, moment=NOW) == override


@pytest.mark.parametrize("owner", [None, ORG_ID], ids=["list", "override"])
def test_latest_effective_from_wins_among_rows_of_one_owner(owner: int | None) -> None:
    older = rates("3", org_id=owner, effective_from=JAN_1)
    newer = rates("2", org_id=owner, effective_from=JAN_1 + timedelta(days=60))
    newest_but_future = rates("1", org_id=owner, effective_from=NOW + timedelta(seconds=1))
    candidates = [newer, newest_but_future, older]

    assert price_pick(candidates, org_id=ORG_ID, moment=NOW) == newer
    assert price_pick(reversed(candidates), org_id=ORG_ID, moment=NOW) == newer


def test_rows_outside_their_effective_window_are_ignored() -> None:
    ended = rates("1", effective_until=NOW)
    not_yet = rates("2", effective_from=NOW + timedelta(microseconds=1))
    in_force = rates("3", effective_from=JAN_1, effective_until=NOW + timedelta(days=1))

    assert price_pick([ended, not_yet, in_force], org_id=ORG_ID, moment=NOW) == in_force
    assert price_pick([ended, not_yet], org_id=ORG_ID, moment=NOW) is None


def test_a_row_applies_from_its_first_moment_until_just_before_its_end() -> None:
    price = rates("1", effective_from=NOW, effective_until=NOW + timedelta(days=1))

    assert price_pick([price], org_id=ORG_ID, moment=NOW) == price
    assert price_pick([price], org_id=ORG_ID, moment=NOW + timedelta(days=1)) is None


def test_expired_override_falls_back_to_the_list_price() -> None:
    list_price = rates("1")
    expired_override = rates("0.5", org_id=ORG_ID, effective_until=NOW - timedelta(days=1))

    assert price_pick([list_price, expired_override], org_id=ORG_ID, moment=NOW) == list_price


def test_another_orgs_override_is_never_used() -> None:
    foreign = rates("0.01", org_id=OTHER_ORG_ID, effective_from=JAN_1 + timedelta(days=90))
    list_price = rates("1")

    assert price_pick([foreign, list_price], org_id=ORG_ID, moment=NOW) == list_price
    assert price_pick([foreign], org_id=ORG_ID, moment=NOW) is None


def test_no_price_applies_to_no_candidates() -> None:
    assert price_pick([], org_id=ORG_ID, moment=NOW) is None


def test_exact_dollars_keep_nine_places_and_never_an_exponent() -> None:
    assert usd_exact(0) == "0.000000000"  # once shown as "0E-9" in /v1/key/info
    assert usd_exact(120) == "0.000000120"
    assert usd_exact(250 * 10**9) == "250.000000000"
    assert usd_exact(-5) == "-0.000000005"
