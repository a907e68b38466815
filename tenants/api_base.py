"""The base of every management API view: who may call it, and how often."""

from django.conf import settings
from django_ratelimit.core import is_ratelimited
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import Throttled
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView


class ManagementAPIView(APIView):
    """Signed-in callers only; each user (or address, before sign-in) gets at most
    TOLLGATE_API_RATE_LIMIT calls, shared across replicas through the cache."""

    authentication_classes = [SessionAuthentication]
    permission_classes = [IsAuthenticated]

    def initial(self, request: Request, *args: object, **kwargs: object) -> None:
        # Counted before authentication, so failed attempts count too.
        if is_ratelimited(
            request._request,
            group="management-api",
            key="user_or_ip",
            rate=settings.TOLLGATE_API_RATE_LIMIT,
            increment=True,
        ):
            raise Throttled(wait=60, detail="Too many API calls. Wait a minute, then retry.")
        super().initial(request, *args, **kwargs)
