"""python manage.py seed_demo [--mock-url URL] [--port PORT]: demo data plus a how-to."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gatewaysite.demo import DEMO_ORG_SLUG, demo_seed


class Command(BaseCommand):
    help = "Create the demo organization (idempotent) and print how to use it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--mock-url", default="http://127.0.0.1:9100/v1")
        parser.add_argument("--port", type=int, default=8000, help="where Tollgate will listen")
        parser.add_argument("--admin-password", default="tollgate-demo")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError(
                "seed_demo creates a superuser with a known password: it only runs with DEBUG on."
            )
        seed = demo_seed(
            mock_base_url=options["mock_url"], admin_password=options["admin_password"]
        )
        base = f"http://127.0.0.1:{options['port']}"
        key = seed.keys["platform-app"]
        self.stdout.write(
            f"""
Tollgate is starting on {base}

  Dashboard:  {base}/dashboard/   sign in as {seed.admin_username!r} (owner), 'finance' or
              'member' (team research); every demo user's password is {seed.admin_password!r}
  Admin:      {base}/admin/   (user {seed.admin_username!r})
  API docs:   {base}/api/docs/   tokens: dashboard Settings > API tokens, or
              manage.py create_api_token --org {DEMO_ORG_SLUG} --name cli --role admin
  Demo key:   {key}
              (team "platform"; saved in var/demo-keys.json with the other demo key)

Try it:

  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

.venv/bin/python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello!"}}]
)
print(reply.choices[0].message.content)
PY
"""
        )
