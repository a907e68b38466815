from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("tenants", "0006_audit_append_only")]

    operations = [
        migrations.AddField(
            model_name="virtualkey",
            name="allowed_ips",
            field=models.JSONField(blank=True, default=list),
        ),
    ]
