from django.urls import path, re_path

from dashboard import finance, views

app_name = "dashboard"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("health/", views.deployment_health, name="health"),
    path("reports/", finance.reports, name="reports"),
    path("statements/", finance.statements, name="statements"),
    re_path(r"^statements/(?P<month>\d{4}-\d{2})/$", finance.statement, name="statement"),
]
