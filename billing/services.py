"""Writes for billing: list prices imported from the pricing catalog, organization overrides."""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from billing.catalog import (
    CATALOG_PROVIDERS,
    CatalogPrice,
    CatalogSkip,
    catalog_price_match,
    catalog_prices_read,
    catalog_version,
)
from billing.models import ModelPrice
from tenants.config import config_revision_bump
from tenants.models import Organization
from tenants.services import Actor, audit_record

logger = logging.getLogger(__name__)

# Rows written per statement; progress is reported after each batch.
IMPORT_BATCH_SIZE = 500

# PostgreSQL advisory lock taken by every writer of catalog list prices (the
# import and catalog_price_ensure), so two of them never both see "no row in
# force" for the same model and both open one. Any fixed number unique in the
# project; it spells "tgcp".
_CATALOG_WRITE_LOCK = 0x74676370

Progress = Callable[[int, int], None]  # (catalog prices compared so far, total)


@dataclass(frozen=True, slots=True)
class PriceDiff:
    """A list price the import adds (`before` is None) or replaces."""

    provider_kind: str
    model: str
    before: CatalogPrice | None
    after: CatalogPrice


@dataclass(frozen=True, slots=True)
class ImportSummary:
    catalog_version: str
    dry_run: bool
    added: int
    changed: int
    unchanged: int
    skipped: int  # catalog prices Tollgate cannot represent exactly (see `skips`)
    held: int  # models whose list price an admin entered by hand: left to the admin
    differences: tuple[PriceDiff, ...]
    skips: tuple[CatalogSkip, ...]
    # (kind, model) of catalog rows priced by an earlier match (see
    # catalog_price_ensure) that the catalog no longer recognises: left in force.
    unmatched: tuple[tuple[str, str], ...] = ()


def catalog_prices_import(
    *, dry_run: bool, progress: Progress | None = None, now: datetime | None = None
) -> ImportSummary:
    """Bring the catalog's list prices into ModelPrice, effective from `now`.

    Idempotent: an unchanged price is left alone. A changed price closes the
    current catalog row and opens a new one, so history is never edited and
    usage events keep the row they were priced with. Organization overrides and
    hand-entered list prices are never touched, and a model with a hand-entered
    list price in force gets no catalog row that would shadow it.

    Catalog rows under names that are no catalog id or alias (dated and
    variant names priced by `catalog_price_ensure`) are matched again by the
    catalog's rules and kept current the same way; a name it no longer
    recognises keeps its row and is reported in `unmatched`. With `dry_run`,
    nothing is written and the differences are only reported.
    """
    now = now or timezone.now()
    listing = catalog_prices_read(moment=now)
    prices = listing.prices
    differences: list[PriceDiff] = []
    skips = list(listing.skipped)
    unmatched: list[tuple[str, str]] = []
    unchanged = held = 0
    with transaction.atomic():
        if not dry_run:
            _lock_catalog_writes()
        # Read under the lock: a concurrent ensure's row is either seen or not yet begun.
        current, held_models = _list_prices_in_force(
            kinds={price.provider_kind for price in prices} | set(CATALOG_PROVIDERS), now=now
        )
        for start in range(0, len(prices), IMPORT_BATCH_SIZE):
            batch = prices[start : start + IMPORT_BATCH_SIZE]
            to_close: list[int] = []
            to_open: list[ModelPrice] = []
            for price in batch:
                pair = (price.provider_kind, price.model)
                row = current.get(pair)
                if pair in held_models:
                    held += 1
                elif row is not None and _same_rates(row, price):
                    unchanged += 1
                else:
                    before = None if row is None else _rates_of(row)
                    differences.append(PriceDiff(*pair, before=before, after=price))
                    if row is not None:
                        to_close.append(row.pk)
                    to_open.append(_row_for(price, now=now))
            if not dry_run:
                _write(to_close=to_close, to_open=to_open, now=now)
            if progress is not None:
                progress(start + len(batch), len(prices))
        # Catalog rows under other names were opened by catalog_price_ensure:
        # the catalog's match rules price them, so they follow its releases too.
        listed = {(price.provider_kind, price.model) for price in prices}
        listed.update((skip.provider_kind, skip.model) for skip in listing.skipped)
        rematch_close: list[int] = []
        rematch_open: list[ModelPrice] = []
        for pair, row in current.items():
            if pair in listed or pair in held_models:
                continue
            match = catalog_price_match(*pair, moment=now)
            if match is None:
                unmatched.append(pair)
            elif isinstance(match, CatalogSkip):
                skips.append(match)  # like a listed name: the row in force stays as it is
            elif _same_rates(row, match):
                unchanged += 1
            else:
                differences.append(PriceDiff(*pair, before=_rates_of(row), after=match))
                rematch_close.append(row.pk)
                rematch_open.append(_row_for(match, now=now))
        if not dry_run:
            _write(to_close=rematch_close, to_open=rematch_open, now=now)
        if differences and not dry_run:
            # update() and bulk_create() send no signals: tell every proxy to reload.
            config_revision_bump()
    added = sum(1 for diff in differences if diff.before is None)
    for kind, model in unmatched:
        logger.warning(
            "catalog list price %s/%s: the catalog no longer recognises the name; "
            "its current price is kept",
            kind,
            model,
        )
    return ImportSummary(
        catalog_version=catalog_version(),
        dry_run=dry_run,
        added=added,
        changed=len(differences) - added,
        unchanged=unchanged,
        skipped=len(skips),
        held=held,
        differences=tuple(differences),
        skips=tuple(skips),
        unmatched=tuple(unmatched),
    )


def catalog_price_ensure(
    *, provider_kind: str, model: str, now: datetime | None = None
) -> ModelPrice | None:
    """A catalog list price for `model` at `provider_kind`, effective from `now`, if it has none.

    For names a deployment is configured with that the import does not list
    (dated and variant names the catalog recognises by its match rules). Does
    nothing, and returns None, when a list price from any source is in force or
    scheduled (an admin's price is never shadowed), when the catalog does not
    recognise the name, or when its price cannot be held exactly. Returns the
    row it created. Idempotent, and safe to call concurrently: at most one row
    is opened.
    """
    now = now or timezone.now()
    if _list_price_exists(provider_kind=provider_kind, model=model, now=now):
        return None  # the usual case, answered without a lock
    match = catalog_price_match(provider_kind, model, moment=now)
    if isinstance(match, CatalogSkip):
        logger.info("no list price for %s/%s: %s", provider_kind, model, match.reason)
    if not isinstance(match, CatalogPrice):
        return None
    with transaction.atomic():
        _lock_catalog_writes()
        # Re-check under the lock: a concurrent call may have opened the row
        # since the check above (READ COMMITTED sees it once it has committed).
        if _list_price_exists(provider_kind=provider_kind, model=model, now=now):
            return None
        # A saved row (not bulk_create): the post_save watcher bumps the
        # configuration revision on commit, so every proxy reloads its prices.
        row = _row_for(match, now=now)
        row.save()
    return row


def _list_price_exists(*, provider_kind: str, model: str, now: datetime) -> bool:
    """A list price (any source) in force at `now` or scheduled to start later."""
    return ModelPrice.objects.filter(
        Q(effective_until__isnull=True) | Q(effective_until__gt=now),
        org__isnull=True,
        provider_kind=provider_kind,
        model=model,
    ).exists()


def _lock_catalog_writes() -> None:
    """Serialise writers of catalog list prices until the transaction ends.

    There is no row to lock before the first price of a model exists, and
    ModelPrice has no unique constraint on (kind, model) (closed rows repeat
    the pair), so PostgreSQL gets a transaction-scoped advisory lock. SQLite
    needs none: its transactions begin IMMEDIATE (see settings), so the one in
    progress already holds the database's only write lock.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CATALOG_WRITE_LOCK])


def _list_prices_in_force(
    *, kinds: set[str], now: datetime
) -> tuple[dict[tuple[str, str], ModelPrice], set[tuple[str, str]]]:
    """The current catalog row per (kind, model), and the models priced by hand."""
    rows = ModelPrice.objects.filter(
        Q(effective_until__isnull=True) | Q(effective_until__gt=now),
        org__isnull=True,
        provider_kind__in=kinds,
    ).order_by("effective_from", "pk")
    current: dict[tuple[str, str], ModelPrice] = {}
    held: set[tuple[str, str]] = set()
    for row in rows:
        pair = (row.provider_kind, row.model)
        if row.source != ModelPrice.Source.CATALOG:
            # Current or scheduled: either way the admin's word outranks the catalog.
            held.add(pair)
        elif row.effective_from <= now:
            current[pair] = row  # ordered by effective_from: the latest wins
    return current, held


def _write(*, to_close: Sequence[int], to_open: Sequence[ModelPrice], now: datetime) -> None:
    if to_close:
        ModelPrice.objects.filter(pk__in=to_close).update(effective_until=now)
    if to_open:
        ModelPrice.objects.bulk_create(to_open)


def _row_for(price: CatalogPrice, *, now: datetime) -> ModelPrice:
    return ModelPrice(
        org=None,
        provider_kind=price.provider_kind,
        model=price.model,
        input_usd_per_mtok=price.input_usd_per_mtok,
        output_usd_per_mtok=price.output_usd_per_mtok,
        cached_input_usd_per_mtok=price.cached_input_usd_per_mtok,
        reasoning_usd_per_mtok=price.reasoning_usd_per_mtok,
        effective_from=now,
        source=ModelPrice.Source.CATALOG,
    )


def _rates_of(row: ModelPrice) -> CatalogPrice:
    return CatalogPrice(
        provider_kind=row.provider_kind,
        model=row.model,
        input_usd_per_mtok=row.input_usd_per_mtok,
        output_usd_per_mtok=row.output_usd_per_mtok,
        cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
        reasoning_usd_per_mtok=row.reasoning_usd_per_mtok,
    )


def _same_rates(row: ModelPrice, price: CatalogPrice) -> bool:
    # Decimal equality ignores trailing zeros: 0.150000 from the database equals 0.15.
    return _rates_of(row) == price


# --- Organization price overrides (negotiated rates) ---

PRICE_RATE_FIELDS = (
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cached_input_usd_per_mtok",
    "reasoning_usd_per_mtok",
)


def price_override_in_force(
    *, org: Organization, provider_kind: str, model: str, now: datetime
) -> ModelPrice | None:
    """The org's override for the model in force at `now` (the latest to take effect)."""
    return (
        ModelPrice.objects.filter(
            Q(effective_until__isnull=True) | Q(effective_until__gt=now),
            org=org,
            provider_kind=provider_kind,
            model=model,
            effective_from__lte=now,
        )
        .order_by("-effective_from", "-pk")
        .first()
    )


def _rates_shown(rates: Mapping[str, Decimal | None]) -> dict[str, str | None]:
    # Audit entries are JSON: exact decimal text, never a float.
    return {
        field: None if rates.get(field) is None else f"{rates[field]:f}"
        for field in PRICE_RATE_FIELDS
    }


@transaction.atomic
def price_override_set(
    *,
    org: Organization,
    provider_kind: str,
    model: str,
    rates: Mapping[str, Decimal | None],
    actor: Actor,
    now: datetime | None = None,
) -> ModelPrice | None:
    """Make `rates` the org's negotiated price for `model` at `provider_kind` from `now` on.

    The override in force closes at `now` and a new row opens, so usage already billed
    keeps the row it was priced with. Rates equal to those in force change nothing and
    return None. Audited; the saved rows bump the configuration revision (post_save),
    so every proxy reloads its prices.
    """
    now = now or timezone.now()
    current = price_override_in_force(org=org, provider_kind=provider_kind, model=model, now=now)
    wanted = {field: rates.get(field) for field in PRICE_RATE_FIELDS}
    before = None if current is None else {f: getattr(current, f) for f in PRICE_RATE_FIELDS}
    # Decimal equality ignores trailing zeros: 0.150000 from the database equals 0.15.
    if before == wanted:
        return None
    row = ModelPrice(
        org=org,
        provider_kind=provider_kind,
        model=model,
        effective_from=now,
        source=ModelPrice.Source.OVERRIDE,
        **wanted,
    )
    row.full_clean()
    if current is not None:
        current.effective_until = now
        current.save(update_fields=["effective_until"])
    row.save()
    audit_record(
        actor=actor,
        org=org,
        action="price_override.set",
        target=row,
        before=None if before is None else _rates_shown(before),
        after={"provider_kind": provider_kind, "model": model, **_rates_shown(wanted)},
    )
    return row


@transaction.atomic
def price_override_end(*, price: ModelPrice, actor: Actor, now: datetime | None = None) -> None:
    """End an org's override at `now`: the list price applies again. The row is kept for
    the usage it priced."""
    if price.org_id is None:
        raise ValueError("only organization overrides end here; list prices follow the catalog")
    now = now or timezone.now()
    price = (
        ModelPrice.objects.select_for_update(of=("self",)).select_related("org").get(pk=price.pk)
    )
    if price.effective_until is not None and price.effective_until <= now:
        return
    price.effective_until = now
    price.save(update_fields=["effective_until"])
    audit_record(
        actor=actor,
        org=price.org,
        action="price_override.end",
        target=price,
        before={
            "provider_kind": price.provider_kind,
            "model": price.model,
            **_rates_shown({f: getattr(price, f) for f in PRICE_RATE_FIELDS}),
        },
        after={"effective_until": now.isoformat()},
    )
