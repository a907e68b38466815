"""Issue a management API token from the command line (the dashboard does it under Settings).

python manage.py create_api_token --org SLUG --name NAME [--role admin|finance|read_only]
    [--expires-days N]
"""

from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenants.api_tokens import api_token_create
from tenants.models import APIToken, Organization
from tenants.services import Actor


class Command(BaseCommand):
    help = "Issue a management API token and print it (only the token, shown this once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", required=True, help="organization slug")
        parser.add_argument("--name", required=True, help="what the token is for")
        parser.add_argument("--role", default=APIToken.Role.READ_ONLY, choices=APIToken.Role.values)
        parser.add_argument("--expires-days", type=int, help="days until the token expires")

    def handle(self, *args: Any, **options: Any) -> None:
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"No organization with slug {options['org']!r}.")
        expires_at = None
        if options["expires_days"] is not None:
            if options["expires_days"] <= 0:
                raise CommandError("--expires-days must be a positive number of days.")
            expires_at = timezone.now() + timedelta(days=options["expires_days"])
        try:
            issued = api_token_create(
                org=org,
                name=options["name"],
                role=options["role"],
                expires_at=expires_at,
                actor=Actor.system("cli"),
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(issued.plaintext)
