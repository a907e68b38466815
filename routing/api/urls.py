from django.urls import path

from routing.api import deployments, health, providers, routes

urlpatterns = [
    path("providers/", providers.ProviderListView.as_view(), name="api-providers"),
    path("providers/<int:pk>/", providers.ProviderDetailView.as_view(), name="api-provider"),
    path("deployments/", deployments.DeploymentListView.as_view(), name="api-deployments"),
    # Before deployments/<int:pk>/ for readers, though "health" never matches an int.
    path("deployments/health/", health.DeploymentHealthView.as_view(), name="deployment-health"),
    path(
        "deployments/<int:pk>/", deployments.DeploymentDetailView.as_view(), name="api-deployment"
    ),
    path("routes/", routes.RouteListView.as_view(), name="api-routes"),
    path("routes/<int:pk>/", routes.RouteDetailView.as_view(), name="api-route"),
]
