"""Routing's write-side workflows, called by the admin (and later the API and config files)."""

import logging

from billing.services import catalog_price_ensure
from routing.models import Deployment

logger = logging.getLogger(__name__)


def deployment_list_price_ensure(deployment: Deployment) -> None:
    """Give the deployment's upstream model the catalog's list price, if it has none yet.

    The import lists only the catalog's ids and aliases; a dated or variant name
    (`claude-haiku-4-5-20251001`) would otherwise be served unpriced. Never raises: a
    missing price is flagged on each usage event, it must not stop a configuration change.
    """
    provider = deployment.provider
    try:
        catalog_price_ensure(provider_kind=provider.kind, model=deployment.upstream_model)
    except Exception:
        logger.exception(
            "catalog price for %s/%s (deployment %s) failed",
            provider.kind,
            deployment.upstream_model,
            deployment.pk,
        )
