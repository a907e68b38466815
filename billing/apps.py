from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        from billing.models import ModelPrice
        from tenants.signals import watch

        watch(ModelPrice)
