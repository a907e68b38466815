"""Rebuild usage rollups from the raw events, showing progress.

python manage.py rollups_recompute --since 2025-03-01 [--until 2025-04-01]
python manage.py rollups_recompute --all        # backfill everything still in the ledger
"""

import time
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from billing.rollups import rollup_state, rollups_rebuild


def _moment(value: str, option: str) -> datetime:
    """An ISO date or date-time; one without an offset is UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{option} must be an ISO date or date-time, not {value!r}.") from None
    return moment.replace(tzinfo=UTC) if timezone.is_naive(moment) else moment


class Command(BaseCommand):
    help = "Rebuild hourly and daily usage rollups (and tag rollups) from the raw events."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", help="start (ISO date or date-time, UTC unless given)")
        parser.add_argument("--until", help="end, exclusive (default: now)")
        parser.add_argument(
            "--all", action="store_true", help="every hour that still has raw events (backfill)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["all"] == bool(options["since"]):
            raise CommandError("Give either --since (with an optional --until) or --all.")
        if options["all"] and options["until"]:
            raise CommandError("--until cannot be combined with --all.")
        since = until = None
        if not options["all"]:
            since = _moment(options["since"], "--since")
            until = _moment(options["until"], "--until") if options["until"] else timezone.now()
            if until <= since:
                raise CommandError("--until must be after --since.")
        pruned_before = rollup_state().pruned_before
        if pruned_before is not None and (since is None or since < pruned_before):
            self.stdout.write(
                f"Raw events before {pruned_before:%Y-%m-%d %H:%M} UTC were pruned: "
                "their rollups are kept as they are."
            )
        started = time.monotonic()
        last_report = [0.0]

        def progress(done: int, total: int) -> None:
            # Every hour for short runs, about once a second for long ones.
            now = time.monotonic()
            if total <= 50 or done == total or now - last_report[0] >= 1.0:
                last_report[0] = now
                self.stdout.write(f"{done}/{total} hours")

        result = rollups_rebuild(since=since, until=until, progress=progress)
        self.stdout.write(
            self.style.SUCCESS(
                f"Rebuilt {result.hours} hour(s) and {result.days} day(s) of rollups "
                f"in {time.monotonic() - started:.1f}s."
            )
        )
