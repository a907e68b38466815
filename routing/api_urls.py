from django.urls import path

from routing import api

urlpatterns = [
    path("deployments/health/", api.DeploymentHealthView.as_view(), name="deployment-health"),
]
