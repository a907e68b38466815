from django.urls import path, re_path

from dashboard import (
    accounts,
    api_tokens,
    audit,
    budgets,
    finance,
    keys,
    org_settings,
    overview,
    providers,
    request_log,
    views,
)

app_name = "dashboard"
urlpatterns = [
    path("", overview.overview, name="overview"),
    path("health/", views.deployment_health, name="health"),
    path("reports/", finance.reports, name="reports"),
    path("statements/", finance.statements, name="statements"),
    re_path(r"^statements/(?P<month>\d{4}-\d{2})/$", finance.statement, name="statement"),
    *accounts.urlpatterns,
    *keys.urlpatterns,
    *budgets.urlpatterns,
    *providers.urlpatterns,
    *request_log.urlpatterns,
    *audit.urlpatterns,
    *org_settings.urlpatterns,
    *api_tokens.urlpatterns,
]
