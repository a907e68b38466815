"""List prices from the bundled genai-prices catalog, imported effective-dated."""

import dataclasses
import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import genai_prices
import pytest
from django.core.management import call_command
from openai import OpenAI

from billing.catalog import CATALOG_PROVIDERS, CatalogListing, catalog_prices_read
from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import ModelPrice, UsageEvent
from billing.pricing import NANOS_PER_USD, cost_nanos, price_pick
from billing.selectors import price_rates_all
from billing.services import catalog_prices_import
from tenants.config import config_revision_get
from tenants.models import Organization
from tests.conftest import IssueKey, MakeRoute
from tests.factories import OrganizationFactory
from tests.support.gateway import GatewayServer, wait_for_events

T1 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
T2 = T1 + timedelta(days=30)
MTOK = 1_000_000


def listed(listing: CatalogListing, kind: str, model: str):
    return next(p for p in listing.prices if (p.provider_kind, p.model) == (kind, model))


def catalog_rows() -> int:
    return ModelPrice.objects.filter(source=ModelPrice.Source.CATALOG).count()


def with_rate(real_reader, *, kind: str, model: str, **rates: Decimal):
    """The real catalog reader, but with one model's rates replaced (a new catalog release)."""

    def read(*, moment: datetime, **kwargs) -> CatalogListing:
        listing = real_reader(moment=moment, **kwargs)
        prices = tuple(
            dataclasses.replace(p, **rates) if (p.provider_kind, p.model) == (kind, model) else p
            for p in listing.prices
        )
        return dataclasses.replace(listing, prices=prices)

    return read


# ---------------------------------------------------------------- reading the catalog


def test_well_known_models_get_the_catalogs_list_prices_as_exact_decimals() -> None:
    listing = catalog_prices_read(moment=T1)

    mini = listed(listing, "openai", "gpt-4o-mini")
    assert (mini.input_usd_per_mtok, mini.output_usd_per_mtok) == (Decimal("0.15"), Decimal("0.6"))
    assert mini.cached_input_usd_per_mtok == Decimal("0.075")
    assert mini.reasoning_usd_per_mtok is None  # reasoning costs the output rate
    haiku = listed(listing, "anthropic", "claude-haiku-4-5")
    assert (haiku.input_usd_per_mtok, haiku.output_usd_per_mtok) == (Decimal(1), Decimal(5))
    assert haiku.cached_input_usd_per_mtok == Decimal("0.1")
    # Exact aliases and the kinds that resell a catalog provider's models are listed too.
    assert listed(listing, "openai", "gpt-4o-mini-2024-07-18") == dataclasses.replace(
        mini, model="gpt-4o-mini-2024-07-18"
    )
    assert listed(listing, "azure", "gpt-4o-mini").input_usd_per_mtok == Decimal("0.15")
    assert listed(listing, "gemini", "gemini-2.0-flash").output_usd_per_mtok > 0
    embedding = listed(listing, "openai", "text-embedding-3-small")
    assert embedding.output_usd_per_mtok == 0  # the catalog charges nothing for output
    # Self-hosted and mock providers have no list price in the catalog.
    assert not {"mock", "vllm", "ollama", "openai_compatible"} & {
        p.provider_kind for p in listing.prices
    }


def test_every_listed_rate_equals_what_the_catalogs_own_calculator_charges() -> None:
    listing = catalog_prices_read(moment=T1)
    assert len(listing.prices) > 1_000
    for price in listing.prices:
        provider = CATALOG_PROVIDERS[price.provider_kind][0]

        def charged(provider=provider, price=price, **tokens: int):
            return genai_prices.calc_price(
                genai_prices.Usage(**tokens),
                price.model,
                provider_id=provider,
                genai_request_timestamp=T1,
            )

        rates = [price.input_usd_per_mtok, price.output_usd_per_mtok]
        assert all(isinstance(rate, Decimal) and rate.is_finite() for rate in rates)
        both = charged(input_tokens=MTOK, output_tokens=MTOK)
        assert (both.input_price, both.output_price) == tuple(rates), price
        if price.cached_input_usd_per_mtok is not None:
            cached = charged(input_tokens=MTOK, cache_read_tokens=MTOK)
            assert cached.input_price == price.cached_input_usd_per_mtok, price


def test_prices_that_cannot_be_held_exactly_are_skipped_with_a_reason() -> None:
    listing = catalog_prices_read(moment=T1)
    skipped = {(s.provider_kind, s.model): s.reason for s in listing.skipped}
    listed_pairs = {(p.provider_kind, p.model) for p in listing.prices}

    # Claude Sonnet 4.5 costs more once a prompt passes 200k tokens.
    assert skipped[("anthropic", "claude-sonnet-4-5")] == "tiered by prompt length"
    # DeepSeek's off-peak discount depends on the time of day.
    assert skipped[("deepseek", "deepseek-chat")] == "price depends on the time of day"
    # Whisper is priced per minute of audio, not per token.
    assert skipped[("openai", "whisper-1")] == "no per-token input price"
    assert not listed_pairs & set(skipped)


# ---------------------------------------------------------------- importing


@pytest.mark.django_db
def test_importing_twice_adds_each_price_once_and_tells_proxies_only_when_it_changed(
    django_capture_on_commit_callbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = catalog_prices_import(dry_run=False, now=T1)
    revision = config_revision_get()
    rows = catalog_rows()
    with django_capture_on_commit_callbacks(execute=True):
        second = catalog_prices_import(dry_run=False, now=T2)

    assert first.added == rows > 1_000
    assert (first.changed, first.unchanged) == (0, 0)
    assert first.skipped == len(first.skips) > 0
    assert (second.added, second.changed, second.unchanged) == (0, 0, rows)
    assert catalog_rows() == rows
    assert revision and config_revision_get() == revision, "a no-op import reloads nothing"
    row = ModelPrice.objects.get(provider_kind="openai", model="gpt-4o-mini")
    assert (row.org, row.source, row.effective_from, row.effective_until) == (
        None, ModelPrice.Source.CATALOG, T1, None,
    )  # fmt: skip
    assert row.input_usd_per_mtok == Decimal("0.15")


@pytest.mark.django_db
def test_a_changed_catalog_price_closes_the_old_row_and_past_usage_keeps_its_price(
    monkeypatch, org: Organization
) -> None:
    catalog_prices_import(dry_run=False, now=T1)
    old = ModelPrice.objects.get(provider_kind="openai", model="gpt-4o-mini")
    used_at = T1 + timedelta(days=1)
    usage = TokenUsage(input_tokens=1_000, output_tokens=500)
    old_pair = ("openai", "gpt-4o-mini")
    rates = price_pick(
        [r for r in price_rates_all() if (r.provider_kind, r.model) == old_pair],
        org_id=org.pk,
        moment=used_at,
    )
    assert rates is not None and rates.price_id == old.pk
    event_id = uuid.uuid4()
    usage_events_write([
        UsageRecord(
            event_id=event_id, org_id=org.pk, team_id=None, key_id=None,
            endpoint="chat.completions", model="gpt-4o-mini", outcome="success",
            status_code=200, started_at=used_at, finished_at=used_at, provider_kind="openai",
            upstream_model="gpt-4o-mini", usage=usage, price_id=rates.price_id,
            cost_nanos=cost_nanos(usage=usage, rates=rates),
        )
    ])  # fmt: skip

    monkeypatch.setattr(
        "billing.services.catalog_prices_read",
        with_rate(catalog_prices_read, kind="openai", model="gpt-4o-mini",
                  input_usd_per_mtok=Decimal("0.2"), cached_input_usd_per_mtok=None),
    )  # fmt: skip
    summary = catalog_prices_import(dry_run=False, now=T2)

    assert (summary.added, summary.changed) == (0, 1)
    old.refresh_from_db()
    assert old.effective_until == T2
    assert (old.input_usd_per_mtok, old.cached_input_usd_per_mtok) == (
        Decimal("0.15"), Decimal("0.075"),
    )  # fmt: skip
    new = ModelPrice.objects.get(provider_kind="openai", model="gpt-4o-mini", effective_until=None)
    assert (new.effective_from, new.source) == (T2, ModelPrice.Source.CATALOG)
    assert (new.input_usd_per_mtok, new.cached_input_usd_per_mtok) == (Decimal("0.2"), None)
    event = UsageEvent.objects.get(id=event_id)
    assert event.price_id == old.pk
    # 1,000 x $0.15 + 500 x $0.60 per million tokens, in nano-USD.
    assert event.cost_nanos == 150_000 + 300_000
    candidates = [r for r in price_rates_all() if (r.provider_kind, r.model) == old_pair]
    at = {moment: price_pick(candidates, org_id=org.pk, moment=moment) for moment in (used_at, T2)}
    assert at[used_at].price_id == old.pk and at[T2].price_id == new.pk


@pytest.mark.django_db
def test_overrides_and_hand_entered_list_prices_are_never_touched(org: Organization) -> None:
    manual = ModelPrice.objects.create(
        provider_kind="openai", model="gpt-4o-mini", input_usd_per_mtok=Decimal("0.11"),
        output_usd_per_mtok=Decimal("0.44"), effective_from=T1 - timedelta(days=400),
        source=ModelPrice.Source.MANUAL,
    )  # fmt: skip
    override = ModelPrice.objects.create(
        org=org, provider_kind="openai", model="gpt-4o", input_usd_per_mtok=Decimal("1"),
        output_usd_per_mtok=Decimal("4"), effective_from=T1 - timedelta(days=400),
        source=ModelPrice.Source.OVERRIDE,
    )  # fmt: skip

    def by_hand() -> list[dict]:
        return list(ModelPrice.objects.filter(pk__in=[manual.pk, override.pk]).values())

    untouched = by_hand()

    summary = catalog_prices_import(dry_run=False, now=T1)
    catalog_prices_import(dry_run=False, now=T2)

    assert by_hand() == untouched
    # The admin's list price stays the one in force: no catalog row shadows it.
    assert summary.held == 1
    assert not ModelPrice.objects.filter(
        provider_kind="openai", model="gpt-4o-mini", source=ModelPrice.Source.CATALOG
    ).exists()
    # The override still wins for its org; everyone else pays the catalog's list price.
    gpt4o = [r for r in price_rates_all() if (r.provider_kind, r.model) == ("openai", "gpt-4o")]
    assert price_pick(gpt4o, org_id=org.pk, moment=T2).price_id == override.pk
    other = OrganizationFactory()
    assert price_pick(gpt4o, org_id=other.pk, moment=T2).org_id is None


@pytest.mark.django_db
def test_a_dry_run_writes_nothing_and_reports_what_would_change(monkeypatch) -> None:
    preview = catalog_prices_import(dry_run=True, now=T1)
    assert ModelPrice.objects.count() == 0
    assert preview.dry_run and preview.added > 1_000
    (diff,) = [d for d in preview.differences if (d.provider_kind, d.model) == ("openai", "o3")]
    assert diff.before is None and diff.after.input_usd_per_mtok > 0

    catalog_prices_import(dry_run=False, now=T1)
    rows = list(ModelPrice.objects.order_by("pk").values())
    monkeypatch.setattr(
        "billing.services.catalog_prices_read",
        with_rate(catalog_prices_read, kind="anthropic", model="claude-haiku-4-5",
                  output_usd_per_mtok=Decimal("6")),
    )  # fmt: skip
    preview = catalog_prices_import(dry_run=True, now=T2)

    assert list(ModelPrice.objects.order_by("pk").values()) == rows
    assert (preview.added, preview.changed) == (0, 1)
    (diff,) = preview.differences
    assert (diff.provider_kind, diff.model) == ("anthropic", "claude-haiku-4-5")
    assert (diff.before.output_usd_per_mtok, diff.after.output_usd_per_mtok) == (5, 6)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.django_db
def test_the_command_shows_progress_and_a_summary_and_its_dry_run_prints_the_diff() -> None:
    preview = io.StringIO()
    call_command("import_prices", "--dry-run", stdout=preview)
    assert "+ openai/gpt-4o-mini: input 0.15, output 0.6, cached input 0.075\n" in (
        preview.getvalue()
    )
    assert "Dry run, nothing written." in preview.getvalue()
    assert ModelPrice.objects.count() == 0

    log = io.StringIO()
    call_command("import_prices", stdout=log)
    total = catalog_rows()
    lines = log.getvalue().splitlines()
    assert f"Importing list prices: {total}/{total}" in lines
    assert len([line for line in lines if line.startswith("Importing list prices:")]) > 1
    assert f"added {total}, changed 0, unchanged 0" in lines[-1]

    terminal = Terminal()
    call_command("import_prices", stdout=terminal)
    # On a terminal the counter is rewritten in place, then the summary follows.
    assert f"\rImporting list prices: {total}/{total}\n" in terminal.getvalue()
    assert f"added 0, changed 0, unchanged {total}" in terminal.getvalue()

    quiet = io.StringIO()
    call_command("import_prices", verbosity=0, stdout=quiet)
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- end to end


@pytest.mark.django_db(transaction=True)
def test_a_request_to_an_openai_deployment_is_billed_at_the_catalog_price(
    gateway: GatewayServer, org: Organization, make_route: MakeRoute, live_key: IssueKey
) -> None:
    call_command("import_prices", verbosity=0)
    # The mock stands in for OpenAI: the deployment is registered as kind "openai".
    make_route(model="gpt-4o-mini", org=org, kind="openai", upstream_model="gpt-4o-mini",
               price=None)  # fmt: skip
    key = live_key(org)
    sdk = OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=15)

    reply = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "What does it cost?"}]
    )

    (event,) = wait_for_events(UsageEvent.objects.filter(org=org).exclude(endpoint="models"), 1)
    assert reply.usage is not None
    assert (event.input_tokens, event.output_tokens) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens,
    )  # fmt: skip
    catalog = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=event.input_tokens, output_tokens=event.output_tokens,
                           cache_read_tokens=event.cached_input_tokens),
        "gpt-4o-mini",
        provider_id="openai",
    )  # fmt: skip
    assert event.cost_nanos == catalog.total_price * NANOS_PER_USD > 0
    assert event.priced
    price = ModelPrice.objects.get(pk=event.price_id)
    assert (price.provider_kind, price.model, price.source, price.org_id) == (
        "openai", "gpt-4o-mini", ModelPrice.Source.CATALOG, None,
    )  # fmt: skip
