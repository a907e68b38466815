"""Writes for billing: list prices imported from the pricing catalog."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.catalog import CatalogPrice, CatalogSkip, catalog_prices_read, catalog_version
from billing.models import ModelPrice
from tenants.config import config_revision_bump

# Rows written per statement; progress is reported after each batch.
IMPORT_BATCH_SIZE = 500

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


def catalog_prices_import(
    *, dry_run: bool, progress: Progress | None = None, now: datetime | None = None
) -> ImportSummary:
    """Bring the catalog's list prices into ModelPrice, effective from `now`.

    Idempotent: an unchanged price is left alone. A changed price closes the
    current catalog row and opens a new one, so history is never edited and
    usage events keep the row they were priced with. Organization overrides and
    hand-entered list prices are never touched, and a model with a hand-entered
    list price in force gets no catalog row that would shadow it. With
    `dry_run`, nothing is written and the differences are only reported.
    """
    now = now or timezone.now()
    listing = catalog_prices_read(moment=now)
    prices = listing.prices
    current, held_models = _list_prices_in_force(
        kinds={price.provider_kind for price in prices}, now=now
    )
    differences: list[PriceDiff] = []
    unchanged = held = 0
    with transaction.atomic():
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
        if differences and not dry_run:
            # update() and bulk_create() send no signals: tell every proxy to reload.
            config_revision_bump()
    added = sum(1 for diff in differences if diff.before is None)
    return ImportSummary(
        catalog_version=catalog_version(),
        dry_run=dry_run,
        added=added,
        changed=len(differences) - added,
        unchanged=unchanged,
        skipped=len(listing.skipped),
        held=held,
        differences=tuple(differences),
        skips=listing.skipped,
    )


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
