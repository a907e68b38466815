"""The proxy's in-process view of configuration: keys, routes and prices.

Built off the request path (see `routing.selectors.config_snapshot_load`) and
swapped atomically, so a request reads one consistent snapshot without a query.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from billing.contracts import PriceRates
from billing.pricing import price_pick
from routing.contracts import RoutePlan
from tenants.contracts import KeyContext


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    revision: str
    keys_by_prefix: Mapping[str, KeyContext]
    # (org id or None for global, public model name) -> plan
    routes: Mapping[tuple[int | None, str], RoutePlan]
    # (provider kind, upstream model) -> every price row for it
    prices: Mapping[tuple[str, str], tuple[PriceRates, ...]]

    def route_for(self, *, org_id: int, model: str) -> RoutePlan | None:
        """The org's own route for `model`, else the global one."""
        return self.routes.get((org_id, model)) or self.routes.get((None, model))

    def plans_for(self, key: KeyContext) -> list[RoutePlan]:
        """The routes `key` may call, by model name (an org's own route over a global one)."""
        chosen = {model: plan for (owner, model), plan in self.routes.items() if owner is None}
        chosen.update(
            {model: plan for (owner, model), plan in self.routes.items() if owner == key.org_id}
        )
        return [chosen[model] for model in sorted(chosen) if key.may_use(model)]

    def price_for(
        self, *, provider_kind: str, model: str, org_id: int, moment: datetime
    ) -> PriceRates | None:
        """The rates in force for this org at `moment`, or None if unpriced."""
        return price_pick(self.prices.get((provider_kind, model), ()), org_id=org_id, moment=moment)


EMPTY_SNAPSHOT = ConfigSnapshot(revision="", keys_by_prefix={}, routes={}, prices={})
