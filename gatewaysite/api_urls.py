"""The management API under /api/v1/, one list of routes per app, and its schema and docs."""

from django.http import HttpRequest, JsonResponse
from django.urls import path, re_path
from django.views.decorators.cache import cache_page
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from billing.api.urls import urlpatterns as billing_urls
from routing.api.urls import urlpatterns as routing_urls
from tenants.api.errors import error_body
from tenants.api.urls import urlpatterns as tenants_urls


@csrf_exempt  # nothing to protect: it only answers 404, to any method
def api_not_found(request: HttpRequest, unmatched: str) -> JsonResponse:
    """Any other path under /api/v1/ (a malformed id too): a JSON 404, like every API error."""
    message = f"No management API endpoint at {request.path[:200]!r}. See /api/docs/."
    return JsonResponse(error_body(message, status=404, code="unknown_endpoint"), status=404)


api_urlpatterns = [
    *tenants_urls,
    *billing_urls,
    *routing_urls,
    re_path(r"^(?P<unmatched>.*)$", api_not_found),
]

docs_urlpatterns = [
    # Public and costly to build (~0.1 s): cached, so it cannot be used to load the server.
    path(
        "schema/",
        cache_page(300, cache="schema")(SpectacularAPIView.as_view()),
        name="api-schema",
    ),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
]
