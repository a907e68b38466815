from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from django_ratelimit.decorators import ratelimit

from gatewaysite.api_urls import api_urlpatterns, docs_urlpatterns

# Brute-force guard on the sign-in of the admin and the dashboard (per client
# address): the 11th attempt in a minute gets 429 (gatewaysite.views.rate_limited).
admin.site.login = ratelimit(key="ip", rate="10/m", method="POST", block=True)(  # type: ignore[method-assign]
    admin.site.login
)
admin.site.site_header = "Tollgate administration"
admin.site.site_title = "Tollgate"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="dashboard:overview", permanent=False)),
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    path("api/v1/", include(api_urlpatterns)),
    path("api/", include(docs_urlpatterns)),
]
