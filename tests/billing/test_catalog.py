"""List prices from the bundled genai-prices catalog, imported effective-dated."""

import dataclasses
import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import genai_prices
import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from openai import OpenAI

from billing.catalog import (
    CATALOG_PROVIDERS,
    CatalogListing,
    CatalogPrice,
    CatalogSkip,
    catalog_price_match,
    catalog_prices_read,
)
from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import ModelPrice, UsageEvent
from billing.pricing import NANOS_PER_USD, cost_nanos, price_pick
from billing.selectors import price_rates_all
from billing.services import catalog_price_ensure, catalog_prices_import
from routing.models import Deployment, Provider
from routing.services import deployment_list_price_ensure
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


# ---------------------------------------------------------------- dated and variant names
# The import lists ids and exact aliases; a deployment's other names are priced
# by the catalog's own match rules when the deployment is saved.

DATED_HAIKU = "claude-haiku-4-5-20251001"  # the catalog matches it by prefix only


def catalog_charge(model: str, provider: str, **tokens: int) -> genai_prices.types.PriceCalculation:
    return genai_prices.calc_price(
        genai_prices.Usage(**tokens), model, provider_id=provider, genai_request_timestamp=T1
    )


def list_rows(kind: str, model: str) -> list[ModelPrice]:
    return list(ModelPrice.objects.filter(provider_kind=kind, model=model, org=None).order_by("pk"))


def deploy(kind: str, upstream_model: str, *, name: str = "dated") -> Deployment:
    """Configure a deployment as the admin does: save it, then ensure its list price."""
    provider = Provider.objects.create(name=f"{kind} {name}", kind=kind)
    deployment = Deployment.objects.create(
        provider=provider, name=name, upstream_model=upstream_model
    )
    deployment_list_price_ensure(deployment)
    return deployment


def test_the_catalogs_match_rules_price_dated_and_variant_names_exactly() -> None:
    listing = catalog_prices_read(moment=T1)
    listed_names = {(p.provider_kind, p.model) for p in listing.prices}
    haiku = catalog_price_match("anthropic", DATED_HAIKU, moment=T1)

    assert ("anthropic", DATED_HAIKU) not in listed_names  # the import alone leaves it unpriced
    assert haiku == dataclasses.replace(
        listed(listing, "anthropic", "claude-haiku-4-5"), model=DATED_HAIKU
    )
    charged = catalog_charge(DATED_HAIKU, "anthropic", input_tokens=MTOK, output_tokens=MTOK)
    assert (charged.input_price, charged.output_price) == (
        haiku.input_usd_per_mtok, haiku.output_usd_per_mtok,
    )  # fmt: skip
    # A compact date is read as the dashed one, as genai-prices itself does.
    compact = catalog_price_match("openai", "gpt-4o-mini-20240718", moment=T1)
    assert compact.model == "gpt-4o-mini-20240718"
    assert compact.input_usd_per_mtok == listed(listing, "openai", "gpt-4o-mini").input_usd_per_mtok
    # Fine-tuned models have their own, higher, price.
    tuned = catalog_price_match("openai", "ft:gpt-4o-mini-2024-07-18:acme::t1", moment=T1)
    assert tuned.input_usd_per_mtok > compact.input_usd_per_mtok
    # Tiered prices are skipped, as in the import; unknown names and kinds are not priced.
    tiered = catalog_price_match("anthropic", "claude-sonnet-4-5-20250929", moment=T1)
    assert isinstance(tiered, CatalogSkip) and tiered.reason == "tiered by prompt length"
    assert catalog_price_match("openai", "acme-private-model", moment=T1) is None
    assert catalog_price_match("mock", "gpt-4o-mini", moment=T1) is None
    assert catalog_price_match("openai", "", moment=T1) is None


@pytest.mark.django_db
def test_saving_a_deployment_gives_its_dated_upstream_model_the_catalog_price_and_reloads_proxies(
    django_capture_on_commit_callbacks,
) -> None:
    revision = config_revision_get()
    with django_capture_on_commit_callbacks(execute=True):
        before = timezone.now()
        deployment = deploy("openai", "gpt-4o-mini-2024-07-18")

    (row,) = list_rows("openai", "gpt-4o-mini-2024-07-18")
    match = catalog_price_match("openai", "gpt-4o-mini-2024-07-18", moment=row.effective_from)
    assert match == CatalogPrice(
        provider_kind="openai", model="gpt-4o-mini-2024-07-18",
        input_usd_per_mtok=row.input_usd_per_mtok, output_usd_per_mtok=row.output_usd_per_mtok,
        cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
        reasoning_usd_per_mtok=row.reasoning_usd_per_mtok,
    )  # fmt: skip
    assert (row.source, row.effective_until) == (ModelPrice.Source.CATALOG, None)
    assert before <= row.effective_from <= timezone.now()
    assert config_revision_get() != revision, "proxies must reload to see the new price"
    assert any(r.price_id == row.pk for r in price_rates_all())

    # Saving again changes nothing; moving it to a dated Claude at Anthropic prices that too.
    deployment_list_price_ensure(deployment)
    deployment.provider = Provider.objects.create(name="claude", kind="anthropic")
    deployment.upstream_model = DATED_HAIKU
    deployment.save()
    deployment_list_price_ensure(deployment)
    assert list_rows("openai", "gpt-4o-mini-2024-07-18") == [row]
    (haiku,) = list_rows("anthropic", DATED_HAIKU)
    assert haiku.input_usd_per_mtok == Decimal(1)


@pytest.mark.django_db
def test_names_the_catalog_does_not_know_or_cannot_price_exactly_stay_unpriced(
    django_capture_on_commit_callbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        deploy("openai", "acme-private-model", name="private")
        deploy("anthropic", "claude-sonnet-4-5-20250929", name="tiered")
        deploy("mock", "gpt-4o-mini", name="mock")

    assert ModelPrice.objects.count() == 0
    assert catalog_price_ensure(provider_kind="openai", model="acme-private-model") is None


@pytest.mark.django_db
def test_a_failing_price_lookup_never_fails_the_deployments_save(
    monkeypatch, caplog, django_capture_on_commit_callbacks
) -> None:
    def broken(**kwargs) -> None:
        raise RuntimeError("catalog unavailable")

    monkeypatch.setattr("routing.services.catalog_price_ensure", broken)
    with django_capture_on_commit_callbacks(execute=True):
        deployment = deploy("anthropic", DATED_HAIKU)

    assert Deployment.objects.filter(pk=deployment.pk).exists()
    assert f"catalog price for anthropic/{DATED_HAIKU}" in caplog.text
    assert ModelPrice.objects.count() == 0


@pytest.mark.django_db
def test_a_list_price_entered_by_an_admin_is_never_overridden(
    django_capture_on_commit_callbacks, org: Organization
) -> None:
    now = timezone.now()
    manual = ModelPrice.objects.create(
        provider_kind="anthropic", model=DATED_HAIKU, input_usd_per_mtok=Decimal("0.5"),
        output_usd_per_mtok=Decimal("2.5"), effective_from=now - timedelta(days=1),
        source=ModelPrice.Source.MANUAL,
    )  # fmt: skip
    scheduled = ModelPrice.objects.create(
        provider_kind="openai", model="gpt-4o-2024-08-06", input_usd_per_mtok=Decimal("2"),
        output_usd_per_mtok=Decimal("8"), effective_from=now + timedelta(days=1),
        source=ModelPrice.Source.MANUAL,
    )  # fmt: skip
    # An organization's override is not a list price: everyone else still needs one.
    ModelPrice.objects.create(
        org=org, provider_kind="openai", model="gpt-4o-mini-20240718",
        input_usd_per_mtok=Decimal("0.1"), output_usd_per_mtok=Decimal("0.4"),
        effective_from=now - timedelta(days=1), source=ModelPrice.Source.OVERRIDE,
    )  # fmt: skip

    with django_capture_on_commit_callbacks(execute=True):
        deploy("anthropic", DATED_HAIKU, name="haiku")
        deploy("openai", "gpt-4o-2024-08-06", name="gpt-4o")
        deploy("openai", "gpt-4o-mini-20240718", name="mini")
    summary = catalog_prices_import(dry_run=False, now=now + timedelta(days=2))

    assert list_rows("anthropic", DATED_HAIKU) == [manual]
    assert list_rows("openai", "gpt-4o-2024-08-06") == [scheduled]
    (mini,) = list_rows("openai", "gpt-4o-mini-20240718")
    assert mini.source == ModelPrice.Source.CATALOG
    assert ("anthropic", DATED_HAIKU) not in {
        (d.provider_kind, d.model) for d in summary.differences
    }


@pytest.mark.django_db
def test_reimporting_keeps_matched_names_current_and_reports_names_no_longer_matched(
    monkeypatch, django_capture_on_commit_callbacks
) -> None:
    catalog_prices_import(dry_run=False, now=T1)
    sonnet = "claude-sonnet-4-20250514"
    for model in (DATED_HAIKU, sonnet, "gpt-4o-mini-20240718"):
        kind = "openai" if model.startswith("gpt") else "anthropic"
        assert catalog_price_ensure(provider_kind=kind, model=model, now=T1) is not None
    old_haiku = ModelPrice.objects.get(provider_kind="anthropic", model=DATED_HAIKU)
    old_sonnet = ModelPrice.objects.get(provider_kind="anthropic", model=sonnet)
    real_match = catalog_price_match

    def new_release(kind: str, model: str, **kwargs):
        """The next catalog release: Haiku costs more, and the Sonnet name is gone."""
        match = real_match(kind, model, **kwargs)
        if model == DATED_HAIKU:
            return dataclasses.replace(match, output_usd_per_mtok=Decimal("5.5"))
        return None if model == sonnet else match

    monkeypatch.setattr("billing.services.catalog_price_match", new_release)
    preview = catalog_prices_import(dry_run=True, now=T2)
    assert [(d.model, d.after.output_usd_per_mtok) for d in preview.differences] == [
        (DATED_HAIKU, Decimal("5.5"))
    ]
    revision = config_revision_get()
    with django_capture_on_commit_callbacks(execute=True):
        summary = catalog_prices_import(dry_run=False, now=T2)

    assert (summary.added, summary.changed) == (0, 1)
    assert summary.unmatched == (("anthropic", sonnet),)
    old_haiku.refresh_from_db()
    assert old_haiku.effective_until == T2 and old_haiku.output_usd_per_mtok == 5
    new_haiku = ModelPrice.objects.get(provider_kind="anthropic", model=DATED_HAIKU,
                                       effective_until=None)  # fmt: skip
    assert (new_haiku.effective_from, new_haiku.source) == (T2, ModelPrice.Source.CATALOG)
    assert (new_haiku.input_usd_per_mtok, new_haiku.output_usd_per_mtok) == (1, Decimal("5.5"))
    # A name the catalog stopped recognising keeps its price rather than turning free.
    assert list_rows("anthropic", sonnet) == [old_sonnet] and old_sonnet.effective_until is None
    assert len(list_rows("openai", "gpt-4o-mini-20240718")) == 1
    assert config_revision_get() != revision
    # The next import with the same release changes nothing.
    again = catalog_prices_import(dry_run=False, now=T2 + timedelta(days=1))
    assert (again.added, again.changed, again.unmatched) == (0, 0, (("anthropic", sonnet),))


@pytest.mark.django_db
def test_ensuring_a_price_twice_opens_one_row() -> None:
    first = catalog_price_ensure(provider_kind="anthropic", model=DATED_HAIKU, now=T1)
    second = catalog_price_ensure(provider_kind="anthropic", model=DATED_HAIKU, now=T2)

    assert first is not None and second is None
    assert list_rows("anthropic", DATED_HAIKU) == [first]
    # The import treats the row as its own: it stays unchanged.
    assert catalog_prices_import(dry_run=False, now=T2).changed == 0
    assert list_rows("anthropic", DATED_HAIKU) == [first]


@pytest.mark.django_db(transaction=True)
def test_concurrent_ensures_never_leave_two_prices_in_force(monkeypatch) -> None:
    real_match = catalog_price_match
    both_checked = threading.Barrier(2, timeout=10)

    def slow_match(*args, **kwargs):
        # Both callers have found no row before either writes one: the race to lose.
        both_checked.wait()
        return real_match(*args, **kwargs)

    monkeypatch.setattr("billing.services.catalog_price_match", slow_match)

    def ensure() -> ModelPrice | None:
        try:
            return catalog_price_ensure(provider_kind="anthropic", model=DATED_HAIKU)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        created = [r for r in pool.map(lambda _: ensure(), range(2)) if r is not None]

    assert len(created) == 1
    assert list_rows("anthropic", DATED_HAIKU) == created


@pytest.mark.django_db(transaction=True)
def test_requests_to_a_dated_openai_deployment_are_billed_at_the_catalogs_match(
    gateway: GatewayServer, org: Organization, make_route: MakeRoute, live_key: IssueKey
) -> None:
    # No import: configuring the deployment alone prices its upstream model.
    dated, tuned = "gpt-4o-mini-2024-07-18", "ft:gpt-4o-mini-2024-07-18:acme::t1"
    for model in (dated, tuned, "acme-private-model"):
        route = make_route(model=model, org=org, kind="openai", upstream_model=model, price=None)
        deployment_list_price_ensure(route.deployments.get())
    sdk = OpenAI(base_url=gateway.v1, api_key=live_key(org), max_retries=0, timeout=15)

    for model in (dated, tuned, "acme-private-model"):
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What does it cost?"}]
        )

    events = wait_for_events(UsageEvent.objects.filter(org=org).exclude(endpoint="models"), 3)
    by_model = {event.model: event for event in events}
    for model in (dated, tuned):
        event = by_model[model]
        catalog = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=event.input_tokens, output_tokens=event.output_tokens,
                               cache_read_tokens=event.cached_input_tokens),
            model,
            provider_id="openai",
        )  # fmt: skip
        assert event.priced and event.cost_nanos == catalog.total_price * NANOS_PER_USD > 0
        price = ModelPrice.objects.get(pk=event.price_id)
        assert (price.model, price.source) == (model, ModelPrice.Source.CATALOG)
    assert by_model[tuned].cost_nanos > by_model[dated].cost_nanos
    unknown = by_model["acme-private-model"]
    assert unknown.input_tokens > 0 and not unknown.priced and unknown.price_id is None


@pytest.mark.django_db
def test_adding_a_deployment_in_the_admin_prices_its_dated_model(
    admin_client, django_capture_on_commit_callbacks
) -> None:
    provider = Provider.objects.create(name="anthropic", kind="anthropic")
    form = {
        "provider": provider.pk, "name": "haiku", "upstream_model": DATED_HAIKU, "weight": 1,
        "priority": 0, "connect_timeout_ms": 5000, "ttft_timeout_ms": 60000,
        "read_timeout_ms": 120000, "total_timeout_ms": 600000, "enabled": "on",
    }  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:routing_deployment_add"), form)
    assert response.status_code == 302, response.content[:2000]
    (row,) = list_rows("anthropic", DATED_HAIKU)
    assert row.source == ModelPrice.Source.CATALOG and row.input_usd_per_mtok == Decimal(1)
