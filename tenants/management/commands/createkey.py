"""Issue a virtual key from the command line.

python manage.py createkey --org SLUG --name NAME [--team SLUG] [--models a,b] [--expires-days N]
    [--rpm N] [--tpm N]
"""

from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenants.models import Organization, Team
from tenants.services import Actor, virtual_key_issue


class Command(BaseCommand):
    help = "Issue a virtual key and print it (only the key, shown this once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", required=True, help="organization slug")
        parser.add_argument("--name", required=True, help="a name for the key")
        parser.add_argument("--team", help="team slug inside the organization")
        parser.add_argument("--models", default="", help="comma-separated allowed models")
        parser.add_argument("--expires-days", type=int, help="days until the key expires")
        parser.add_argument("--rpm", type=int, help="requests per minute this key may make")
        parser.add_argument("--tpm", type=int, help="tokens per minute this key may use")

    def handle(self, *args: Any, **options: Any) -> None:
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"No organization with slug {options['org']!r}.")
        team = None
        if options["team"]:
            team = Team.objects.filter(org=org, slug=options["team"]).first()
            if team is None:
                raise CommandError(f"No team {options['team']!r} in {org.slug}.")
        expires_at = None
        if options["expires_days"] is not None:
            if options["expires_days"] <= 0:
                raise CommandError("--expires-days must be a positive number of days.")
            expires_at = timezone.now() + timedelta(days=options["expires_days"])
        models = [name.strip() for name in options["models"].split(",") if name.strip()]
        try:
            issued = virtual_key_issue(
                org=org,
                team=team,
                name=options["name"],
                allowed_models=models,
                expires_at=expires_at,
                rpm_limit=options["rpm"],
                tpm_limit=options["tpm"],
                actor=Actor.system("cli"),
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(issued.plaintext)
