"""python manage.py import_prices [--dry-run]: list prices from the bundled pricing catalog.

Reads only the data inside the installed `genai-prices` package (no network),
so it is safe and quick to run at every deploy, after `migrate`.
"""

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.services import ImportSummary, PriceDiff, catalog_prices_import

_RATE_LABELS = {
    "input_usd_per_mtok": "input",
    "output_usd_per_mtok": "output",
    "cached_input_usd_per_mtok": "cached input",
    "reasoning_usd_per_mtok": "reasoning",
}


class Command(BaseCommand):
    help = "Import list prices from the genai-prices catalog (idempotent, effective-dated)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="print the differences, write nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        dry_run: bool = options["dry_run"]
        progress = self._progress if verbosity >= 1 and not dry_run else None
        summary = catalog_prices_import(dry_run=dry_run, progress=progress)
        if dry_run and verbosity >= 1 and summary.differences:
            self.stdout.write("List prices in USD per million tokens (+ new, ~ changed):")
            for diff in summary.differences:
                self.stdout.write(_describe(diff))
        if verbosity >= 2:
            for skip in summary.skips:
                self.stdout.write(f"  skipped {skip.provider_kind}/{skip.model}: {skip.reason}")
        if verbosity >= 1:
            self.stdout.write(_summary_line(summary))

    def _progress(self, done: int, total: int) -> None:
        # In place on a terminal; one line per batch in logs, where \r would pile up.
        if self.stdout.isatty():
            self.stdout.write(f"\rImporting list prices: {done}/{total}", ending="")
            if done == total:
                self.stdout.write("")
        else:
            self.stdout.write(f"Importing list prices: {done}/{total}")


def _describe(diff: PriceDiff) -> str:
    name = f"{diff.provider_kind}/{diff.model}"
    if diff.before is None:
        rates = ", ".join(
            f"{label} {_usd(getattr(diff.after, field))}"
            for field, label in _RATE_LABELS.items()
            if getattr(diff.after, field) is not None
        )
        return f"+ {name}: {rates}"
    changes = ", ".join(
        f"{label} {_usd(getattr(diff.before, field))} -> {_usd(getattr(diff.after, field))}"
        for field, label in _RATE_LABELS.items()
        if getattr(diff.before, field) != getattr(diff.after, field)
    )
    return f"~ {name}: {changes}"


def _usd(rate: Decimal | None) -> str:
    # "-" is a blank rate: cached input then costs the input rate, reasoning the output rate.
    return "-" if rate is None else f"{rate.normalize():f}"


def _summary_line(summary: ImportSummary) -> str:
    head = "Dry run, nothing written. " if summary.dry_run else ""
    verb = "would add" if summary.dry_run else "added"
    change = "would change" if summary.dry_run else "changed"
    return (
        f"{head}genai-prices {summary.catalog_version}: {verb} {summary.added}, "
        f"{change} {summary.changed}, unchanged {summary.unchanged}, "
        f"skipped {summary.skipped} (tiered or not per-token; -v 2 lists them), "
        f"kept {summary.held} hand-entered list prices."
    )
