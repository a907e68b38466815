from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        from routing.models import Deployment, Provider, Route
        from tenants.signals import watch, watch_relation

        watch(Provider, Deployment, Route)
        watch_relation(Route.deployments.through)
