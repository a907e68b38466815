import django.core.validators
from django.db import migrations, models


def _limit(help_text: str) -> models.PositiveIntegerField:
    return models.PositiveIntegerField(
        blank=True,
        help_text=help_text,
        null=True,
        validators=[django.core.validators.MinValueValidator(1)],
    )


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name=model,
            name=name,
            field=_limit(help_text),
        )
        for model in ("organization", "team", "virtualkey")
        for name, help_text in (
            ("rpm_limit", "Requests per minute (blank: no limit)."),
            ("tpm_limit", "Tokens per minute (blank: no limit)."),
        )
    ]
