"""manage.py config apply|export|import-litellm: configuration as code.

    config apply FILE [--dry-run] [--prune]     make the database match FILE
    config export [--org SLUG] [-o FILE]        the running configuration as that YAML
    config import-litellm FILE [--org SLUG] [--dry-run] [-o FILE]
                                                a LiteLLM proxy config.yaml, applied

The format is described in docs/config-as-code.md.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from gatewaysite.config_as_code.export import config_export
from gatewaysite.config_as_code.litellm import litellm_config_translate
from gatewaysite.config_as_code.loader import InvalidConfig, yaml_dump, yaml_load
from gatewaysite.config_as_code.plan import Plan, config_apply
from gatewaysite.config_as_code.schema import config_file_read
from tenants.models import Organization
from tenants.services import Actor

_SYMBOLS = {"create": "+", "update": "~", "delete": "-", "disable": "-", "end": "-"}


class Command(BaseCommand):
    help = "Configuration as code: apply a YAML file, export one, or import LiteLLM's."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        apply = actions.add_parser(
            "apply", help="make the configuration match a file (prints the differences first)"
        )
        apply.add_argument("file", help="the configuration file; - reads standard input")
        apply.add_argument(
            "--dry-run", action="store_true", help="print the differences, write nothing"
        )
        apply.add_argument(
            "--prune",
            action="store_true",
            help="also remove what the file leaves out, in the lists it gives (teams and "
            "budgets deleted, price overrides ended, providers, deployments and routes "
            "disabled)",
        )
        export = actions.add_parser("export", help="write the running configuration as YAML")
        export.add_argument("--org", help="only this organization (its slug)")
        export.add_argument("--output", "-o", help="write to this file instead of the output")
        litellm = actions.add_parser(
            "import-litellm", help="apply a LiteLLM proxy config.yaml (model_list, settings)"
        )
        litellm.add_argument("file", help="LiteLLM's config.yaml; - reads standard input")
        litellm.add_argument(
            "--org", help="the organization to import into (default: the only one there is)"
        )
        litellm.add_argument(
            "--dry-run", action="store_true", help="print the differences, write nothing"
        )
        litellm.add_argument(
            "--output",
            "-o",
            help="write Tollgate's YAML to this file (- for the output) instead of applying it",
        )
        for action in (apply, export, litellm):
            # Also after the action (`config apply FILE -v 2`), as people type it.
            action.add_argument(
                "-v", "--verbosity", type=int, choices=[0, 1, 2, 3], default=argparse.SUPPRESS,
                help="2 also lists what is unchanged",
            )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        self.verbosity: int = options["verbosity"]
        action = options["action"]
        if action == "apply":
            self.apply(options["file"], dry_run=options["dry_run"], prune=options["prune"])
        elif action == "export":
            self.export(org_slug=options["org"], output=options["output"])
        else:
            self.import_litellm(
                options["file"], org_slug=options["org"], dry_run=options["dry_run"],
                output=options["output"],
            )  # fmt: skip

    # --- apply ---

    def apply(self, path: str, *, dry_run: bool, prune: bool) -> None:
        try:
            raw = yaml_load(self.read(path))
        except InvalidConfig as invalid:
            self.fail(path, invalid)
        self.apply_document(
            raw, source=path, dry_run=dry_run, prune=prune, actor=Actor.system("config apply")
        )

    def apply_document(
        self,
        raw: Any,
        *,
        source: str,
        dry_run: bool,
        prune: bool,
        actor: Actor,
        note: str = "",
    ) -> None:
        config, problems = config_file_read(raw, env=os.environ)
        try:
            plan = config_apply(
                config, actor=actor, prune=prune, dry_run=dry_run, on_plan=self.report,
                read_problems=problems,
            )  # fmt: skip
        except InvalidConfig as invalid:
            self.fail(source, invalid, note=note)
        if not plan.changes:
            return
        if dry_run:
            self.stdout.write("Dry run: nothing was written.")
        else:
            self.stdout.write(self.style.SUCCESS(f"Applied {len(plan.changes)} change(s)."))

    def report(self, plan: Plan) -> None:
        """The differences, before anything is written; never a secret's value."""
        for warning in plan.warnings:
            self.stderr.write(f"warning: {warning}")
        for change in plan.changes:
            where = change.path or "not in the file"
            symbol = _SYMBOLS[change.action]
            self.stdout.write(f"{symbol} {change.action} {change.kind} {change.label}  ({where})")
            for field in change.fields:
                if field.old is None:
                    self.stdout.write(f"    {field.name}: {field.new}")
                else:
                    self.stdout.write(f"    {field.name}: {field.old} → {field.new}")
        if self.verbosity >= 2:
            for label in plan.unchanged:
                self.stdout.write(f"= unchanged {label}")
        if not plan.changes:
            self.stdout.write(
                f"No changes: the configuration matches the file ({len(plan.unchanged)} "
                "objects unchanged)."
            )
            return
        removed = plan.count("delete", "disable", "end")
        self.stdout.write(
            f"Plan: {plan.count('create')} to create, {plan.count('update')} to update, "
            f"{removed} to remove, {len(plan.unchanged)} unchanged."
        )

    # --- export ---

    def export(self, *, org_slug: str | None, output: str | None) -> None:
        if org_slug is not None and not Organization.objects.filter(slug=org_slug).exists():
            raise CommandError(f"No organization with slug {org_slug!r}.")
        export = config_export(org_slug=org_slug)
        header = [
            f"# Tollgate configuration, exported {timezone.now():%Y-%m-%d %H:%M:%S} UTC.",
            "# Apply it with: manage.py config apply FILE [--dry-run] [--prune]",
        ]
        if export.env_vars:
            header.append("# Credentials come from these environment variables; set them first:")
            header.extend(f"#   {name}" for name in export.env_vars)
        text = "\n".join(header) + "\n" + yaml_dump(export.document)
        for note in export.notes:
            self.stderr.write(f"note: {note}")
        self.write_output(text, output)

    # --- import-litellm ---

    def import_litellm(
        self, path: str, *, org_slug: str | None, dry_run: bool, output: str | None
    ) -> None:
        if org_slug is None:
            slugs = list(Organization.objects.order_by("slug").values_list("slug", flat=True)[:2])
            if len(slugs) != 1:
                raise CommandError("Give --org SLUG: the organization to import into.")
            org_slug = slugs[0]
        elif output is None and not Organization.objects.filter(slug=org_slug).exists():
            raise CommandError(f"No organization with slug {org_slug!r}: create it first.")
        try:
            translated = litellm_config_translate(yaml_load(self.read(path)), org_slug=org_slug)
        except InvalidConfig as invalid:
            self.fail(path, invalid)
        for warning in translated.warnings:
            self.stderr.write(f"warning: {warning}")
        if output is not None:
            header = f"# Tollgate configuration translated from LiteLLM's {Path(path).name}.\n"
            self.write_output(header + yaml_dump(translated.document), output)
            return
        self.apply_document(
            translated.document,
            source=path,
            dry_run=dry_run,
            prune=False,
            actor=Actor.system("config import-litellm"),
            note="The paths are in Tollgate's translation of the file: see it with --output -.",
        )

    # --- files ---

    def read(self, path: str) -> str:
        if path == "-":
            return sys.stdin.read()
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"Cannot read {path}: {error.__class__.__name__}.") from None

    def write_output(self, text: str, output: str | None) -> None:
        if output is None or output == "-":
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as error:
            raise CommandError(f"Cannot write {output}: {error.strerror}.") from None
        if self.verbosity >= 1:
            self.stderr.write(f"Wrote {output}.")

    def fail(self, source: str, invalid: InvalidConfig, *, note: str = "") -> NoReturn:
        for problem in invalid.problems:
            self.stderr.write(f"{source}: {problem}")
        if note:
            self.stderr.write(note)
        count = len(invalid.problems)
        raise CommandError(f"{count} problem(s) in {source}; nothing was written.")
