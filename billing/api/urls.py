from django.urls import path

from billing.api import alert_channels, budgets, statements, usage

urlpatterns = [
    path("budgets/", budgets.BudgetListView.as_view(), name="api-budgets"),
    path("budgets/<int:pk>/", budgets.BudgetDetailView.as_view(), name="api-budget"),
    path(
        "alert-channels/",
        alert_channels.AlertChannelListView.as_view(),
        name="api-alert-channels",
    ),
    path(
        "alert-channels/<int:pk>/",
        alert_channels.AlertChannelDetailView.as_view(),
        name="api-alert-channel",
    ),
    path(
        "alert-channels/<int:pk>/rotate-secret/",
        alert_channels.AlertChannelRotateSecretView.as_view(),
        name="api-alert-channel-rotate-secret",
    ),
    path(
        "alert-channels/<int:pk>/test/",
        alert_channels.AlertChannelTestView.as_view(),
        name="api-alert-channel-test",
    ),
    path("usage/summary/", usage.UsageSummaryView.as_view(), name="api-usage-summary"),
    path("usage/breakdown/", usage.UsageBreakdownView.as_view(), name="api-usage-breakdown"),
    path("usage/series/", usage.UsageSeriesView.as_view(), name="api-usage-series"),
    path("reports/costs/", usage.CostReportView.as_view(), name="api-cost-report"),
    path("statements/", statements.StatementListView.as_view(), name="api-statements"),
    path(
        "statements/preview/",
        statements.StatementPreviewView.as_view(),
        name="api-statement-preview",
    ),
    path("statements/<int:pk>/", statements.StatementDetailView.as_view(), name="api-statement"),
]
