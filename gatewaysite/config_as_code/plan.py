"""The differences between a configuration file and the database, and applying them.

A plan is built by comparing each spec with the object of the same natural key. Every
write goes through the owning app's service functions (validation, audit entries and
configuration revision bumps happen exactly as for the dashboard and the API), and only
for what differs: applying a file twice changes nothing the second time.
"""

import hmac
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DatabaseError, transaction
from django.db.models import Model
from django.utils import timezone

from billing.pricing import NANOS_PER_USD
from billing.services import PRICE_RATE_FIELDS, price_override_end, price_override_set
from routing.models import Deployment, Provider, Route
from routing.providers.presets import default_base_url
from routing.services import (
    deployment_create,
    deployment_update,
    provider_base_url_check,
    provider_create,
    provider_update,
    route_create,
    route_update,
)
from tenants.crypto import SecretUnreadable
from tenants.members import organization_settings_update
from tenants.models import Budget, Organization, Team
from tenants.services import (
    Actor,
    budget_create,
    budget_delete,
    budget_update,
    organization_create,
    organization_limits_update,
    team_create,
    team_delete,
    team_update,
)

from .loader import InvalidConfig, Problem
from .schema import (
    DEFAULT_SOFT_THRESHOLDS,
    ORGANIZATION_FIELDS,
    TEAM_FIELDS,
    BudgetSpec,
    ConfigFile,
    Credential,
    DeploymentRef,
    OrganizationSpec,
    PriceSpec,
    ProviderSpec,
    RouteSpec,
    TeamSpec,
)
from .state import (
    DeploymentKey,
    OrganizationState,
    deployment_key,
    global_route_names,
    organization_state_read,
)


@dataclass(frozen=True, slots=True)
class FieldChange:
    name: str
    old: str | None  # None when the object is new
    new: str


@dataclass
class Change:
    action: str  # create, update, delete, disable or end
    kind: str  # organization, team, budget, provider, deployment, route or price
    label: str
    path: str  # where the file describes it; "" for objects the file leaves out
    fields: list[FieldChange]
    run: Callable[[], None] = field(repr=False)


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # "team acme/search"
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def count(self, *actions: str) -> int:
        return sum(1 for change in self.changes if change.action in actions)


def config_apply(
    config: ConfigFile,
    *,
    actor: Actor,
    prune: bool = False,
    dry_run: bool = False,
    on_plan: Callable[[Plan], None] = lambda plan: None,
    read_problems: Sequence[Problem] = (),
) -> Plan:
    """Validate `config` against the database, report the plan, then apply it in one transaction.

    Raises InvalidConfig (nothing written) when reading the file found `read_problems`,
    when the file refers to what does not exist, or when a service refuses a change.
    References are checked even when reading found problems, so one run reports them all.

    With `dry_run`, every change is still made, so the services validate it exactly,
    and then rolled back: nothing is written, no audit entry, no configuration revision
    bump. With `prune`, objects of the kinds an organization lists that the file leaves
    out are removed: teams and budgets deleted, price overrides ended, providers,
    deployments and routes disabled (they are kept, as the dashboard keeps them: usage
    history and health refer to them).
    """
    with transaction.atomic():
        plan = _Planner(actor=actor, prune=prune).build(config)
        # A field that could not be read is reported once, not again as missing.
        seen = {problem.path for problem in read_problems}
        problems = [*read_problems, *(p for p in plan.problems if p.path not in seen)]
        if problems:
            raise InvalidConfig(problems)
        on_plan(plan)
        for change in plan.changes:
            try:
                change.run()
            except ValidationError as refused:
                where = change.path or f"{change.kind} {change.label}"
                raise InvalidConfig([Problem(where, " ".join(refused.messages))]) from None
            except DatabaseError as error:
                where = change.path or f"{change.kind} {change.label}"
                message = f"the database refused the change: {type(error).__name__}"
                raise InvalidConfig([Problem(where, message)]) from None
        if dry_run:
            transaction.set_rollback(True)
    return plan


# --- How values are shown in a plan (never a secret) ---


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, Model):
        return json.dumps(str(value), ensure_ascii=False)
    return str(value)


def usd(nanos: int) -> Decimal:
    return (Decimal(nanos) / NANOS_PER_USD).normalize()


def _differences(instance: Model | None, values: dict[str, Any]) -> list[FieldChange]:
    changes = []
    for name, new in values.items():
        if instance is None:
            changes.append(FieldChange(name, None, show(new)))
            continue
        old = getattr(instance, name)
        if old != new:
            changes.append(FieldChange(name, show(old), show(new)))
    return changes


def _same_secret(provider: Provider, wanted: str) -> bool:
    """Whether the stored key is `wanted`, compared in constant time, neither one shown."""
    if not provider.has_api_key:
        return False
    try:
        stored = provider.api_key()
    except SecretUnreadable:
        return False  # stored under a key no longer configured: store it again
    return hmac.compare_digest(stored.encode(), wanted.encode())


@dataclass
class _Built:
    """Objects by natural key, filled from the database and as the plan creates them."""

    orgs: dict[str, Organization] = field(default_factory=dict)
    teams: dict[tuple[str, str], Team] = field(default_factory=dict)
    providers: dict[tuple[str, str], Provider] = field(default_factory=dict)
    deployments: dict[tuple[str, str, str], Deployment] = field(default_factory=dict)


class _Planner:
    def __init__(self, *, actor: Actor, prune: bool) -> None:
        self.actor = actor
        self.prune = prune
        self.now: datetime = timezone.now()
        self.plan = Plan()
        self.built = _Built()
        self.global_routes: set[str] | None = None

    def build(self, config: ConfigFile) -> Plan:
        for spec in config.organizations:
            _OrganizationPlanner(self, spec).build()
        return self.plan

    def problem(self, path: str, message: str) -> None:
        self.plan.problems.append(Problem(path, message))

    def change(
        self,
        action: str,
        kind: str,
        label: str,
        path: str,
        fields: list[FieldChange],
        run: Callable[[], None],
    ) -> None:
        self.plan.changes.append(Change(action, kind, label, path, fields, run))

    def unchanged(self, kind: str, label: str) -> None:
        self.plan.unchanged.append(f"{kind} {label}")

    def global_route_names(self) -> set[str]:
        if self.global_routes is None:
            self.global_routes = global_route_names()
        return self.global_routes


class _OrganizationPlanner:
    """The plan for one organization of the file, in the order changes must run:
    the organization, teams, providers and deployments, routes, budgets, prices."""

    def __init__(self, planner: _Planner, spec: OrganizationSpec) -> None:
        self.p = planner
        self.spec = spec
        self.slug = spec.slug
        self.state: OrganizationState = organization_state_read(spec.slug, now=planner.now)
        self.retired_teams: set[str] = set()
        self.retired_deployments: set[DeploymentKey] = set()
        self.retired_routes: set[str] = set()
        self.budgets_deleted: set[int] = set()

    @property
    def org(self) -> Organization:
        return self.p.built.orgs[self.slug]

    def build(self) -> None:
        self.organization()
        if self.spec.teams is not None:
            self.teams(self.spec.teams)
        if self.spec.providers is not None:
            self.providers(self.spec.providers)
        if self.spec.routes is not None:
            self.routes(self.spec.routes)
        if self.spec.budgets is not None:
            self.budgets(self.spec.budgets)
        if self.spec.prices is not None:
            self.prices(self.spec.prices)
        if self.spec.teams is not None:
            self.teams_pruned()

    # --- the organization ---

    def organization(self) -> None:
        spec, org = self.spec, self.state.org
        if org is not None:
            self.p.built.orgs[self.slug] = org
        label = self.slug
        if org is None:
            if "name" not in spec.values:
                self.p.problem(
                    f"{spec.path}.name", f"required to create organization {self.slug!r}"
                )
            self.p.change(
                "create", "organization", label, spec.path,
                _differences(None, spec.values), lambda: self._organization_create(spec.values),
            )  # fmt: skip
            return
        changes = _differences(org, spec.values)
        if not changes:
            self.p.unchanged("organization", label)
            return
        changed = {change.name for change in changes}
        self.p.change(
            "update", "organization", label, spec.path, changes,
            lambda: self._organization_update(org, spec.values, changed),
        )  # fmt: skip

    def _organization_create(self, values: dict[str, Any]) -> None:
        actor = self.p.actor
        org = organization_create(
            slug=self.slug, name=values["name"], time_zone=values.get("time_zone", "UTC"),
            actor=actor,
        )  # fmt: skip
        if values.get("log_request_bodies"):
            org = organization_settings_update(
                org=org, name=org.name, time_zone=org.time_zone, log_request_bodies=True,
                actor=actor,
            )  # fmt: skip
        if values.get("rpm_limit") is not None or values.get("tpm_limit") is not None:
            org = organization_limits_update(
                org=org, actor=actor,
                rpm_limit=values.get("rpm_limit"), tpm_limit=values.get("tpm_limit"),
            )  # fmt: skip
        self.p.built.orgs[self.slug] = org

    def _organization_update(
        self, org: Organization, values: dict[str, Any], changed: set[str]
    ) -> None:
        merged = {name: values.get(name, getattr(org, name)) for name in ORGANIZATION_FIELDS}
        if changed & {"name", "time_zone", "log_request_bodies"}:
            org = organization_settings_update(
                org=org, name=merged["name"], time_zone=merged["time_zone"],
                log_request_bodies=merged["log_request_bodies"], actor=self.p.actor,
            )  # fmt: skip
        if changed & {"rpm_limit", "tpm_limit"}:
            org = organization_limits_update(
                org=org, actor=self.p.actor,
                rpm_limit=merged["rpm_limit"], tpm_limit=merged["tpm_limit"],
            )  # fmt: skip
        self.p.built.orgs[self.slug] = org

    # --- teams ---

    def teams(self, specs: Iterable[TeamSpec]) -> None:
        named = set()
        for spec in specs:
            named.add(spec.slug)
            self.team(spec)
        if not self.p.prune:
            return
        for slug in sorted(set(self.state.teams) - named):
            if slug in self.state.teams_with_keys:
                self.p.plan.warnings.append(
                    f"team {self.slug}/{slug} is not in the file but still has virtual keys "
                    "(revoked ones count: their usage names the team): kept"
                )
            else:
                self.retired_teams.add(slug)

    def team(self, spec: TeamSpec) -> None:
        team = self.state.teams.get(spec.slug)
        label = f"{self.slug}/{spec.slug}"
        if team is not None:
            self.p.built.teams[(self.slug, spec.slug)] = team
        if team is None:
            if "name" not in spec.values:
                self.p.problem(f"{spec.path}.name", f"required to create team {spec.slug!r}")

            def create() -> None:
                created = team_create(
                    org=self.org, slug=spec.slug, name=spec.values["name"], actor=self.p.actor
                )
                rpm, tpm = spec.values.get("rpm_limit"), spec.values.get("tpm_limit")
                if rpm is not None or tpm is not None:
                    created = team_update(
                        team=created, actor=self.p.actor, name=created.name,
                        rpm_limit=rpm, tpm_limit=tpm,
                    )  # fmt: skip
                self.p.built.teams[(self.slug, spec.slug)] = created

            self.p.change(
                "create", "team", label, spec.path, _differences(None, spec.values), create
            )
            return
        changes = _differences(team, spec.values)
        if not changes:
            self.p.unchanged("team", label)
            return

        def update() -> None:
            merged = {name: spec.values.get(name, getattr(team, name)) for name in TEAM_FIELDS}
            team_update(team=team, actor=self.p.actor, **merged)

        self.p.change("update", "team", label, spec.path, changes, update)

    def teams_pruned(self) -> None:
        """Delete the teams the file leaves out (with --prune), after their budgets."""
        for slug in sorted(self.retired_teams):
            team = self.state.teams[slug]
            for budget in self.state.budgets:
                if budget.team_id == team.pk and budget.pk not in self.budgets_deleted:
                    self._budget_delete(budget)

            def delete(team: Team = team) -> None:
                team_delete(team=team, actor=self.p.actor)

            self.p.change("delete", "team", f"{self.slug}/{slug}", "", [], delete)

    # --- budgets ---

    def _budget_label(self, team: str | None, period: str, enforcement: str) -> str:
        target = f"team {team}" if team else "organization"
        return f"{self.slug}: {target}, {period}, {enforcement}"

    def budgets(self, specs: Iterable[BudgetSpec]) -> None:
        unmatched = list(self.state.budgets)

        def target(budget: Budget) -> str | None:
            return budget.team.slug if budget.team is not None else None

        # Budgets have no name: match on target, period and enforcement, then on less,
        # so editing a budget's enforcement or period updates it in place.
        keys: list[Callable[[Any], tuple[Any, ...]]] = [
            lambda b: (b.team, b.period, b.enforcement),
            lambda b: (b.team, b.period),
            lambda b: (b.team,),
        ]
        specs_in_order = list(specs)
        pending = list(specs_in_order)
        matched: list[tuple[BudgetSpec, Budget]] = []
        for key in keys:
            still = []
            for spec in pending:
                found = next(
                    (
                        budget for budget in unmatched
                        if key(_BudgetView(target(budget), budget.period, budget.enforcement))
                        == key(spec)
                    ),
                    None,
                )  # fmt: skip
                if found is None:
                    still.append(spec)
                else:
                    unmatched.remove(found)
                    matched.append((spec, found))
            pending = still
        found = {id(spec): budget for spec, budget in matched}
        for spec in specs_in_order:
            self.budget(spec, found.get(id(spec)))
        if self.p.prune:
            for budget in unmatched:
                self._budget_delete(budget)

    def budget(self, spec: BudgetSpec, budget: Budget | None) -> None:
        if spec.team is not None and not self._team_exists(spec.team):
            self.p.problem(f"{spec.path}.team", self._unknown_team(spec.team))
            return
        if "limit_nanos" not in spec.values:
            return  # unreadable: reading the file reported it
        label = self._budget_label(spec.team, spec.period, spec.enforcement)
        wanted: dict[str, Any] = {
            "period": spec.period,
            "enforcement": spec.enforcement,
            "limit_nanos": spec.values["limit_nanos"],
            "soft_thresholds": spec.values.get(
                "soft_thresholds",
                list(DEFAULT_SOFT_THRESHOLDS) if budget is None else budget.soft_thresholds,
            ),
        }
        # Shown in dollars, as the file usually gives the limit.
        new = {**wanted, "limit_nanos": usd(wanted["limit_nanos"])}
        old = None
        if budget is not None:
            old = {name: getattr(budget, name) for name in wanted}
            old["limit_nanos"] = usd(budget.limit_nanos)
        changes = [
            FieldChange(
                "limit_usd" if name == "limit_nanos" else name,
                None if old is None else show(old[name]),
                show(value),
            )
            for name, value in new.items()
            if old is None or old[name] != value
        ]
        if budget is None:

            def create() -> None:
                team = self._team(spec.team) if spec.team else None
                budget_create(
                    org=self.org, scope=Budget.Scope.TEAM if team else Budget.Scope.ORG,
                    team=team, actor=self.p.actor, **wanted,
                )  # fmt: skip

            self.p.change("create", "budget", label, spec.path, changes, create)
        elif not changes:
            self.p.unchanged("budget", label)
        else:

            def update(budget: Budget = budget) -> None:
                budget_update(budget=budget, actor=self.p.actor, **wanted)

            self.p.change("update", "budget", label, spec.path, changes, update)

    def _budget_delete(self, budget: Budget) -> None:
        self.budgets_deleted.add(budget.pk)
        team = budget.team.slug if budget.team is not None else None
        label = self._budget_label(team, budget.period, budget.enforcement)

        def delete() -> None:
            budget_delete(budget=budget, actor=self.p.actor)

        self.p.change("delete", "budget", label, "", [], delete)

    def _team(self, slug: str) -> Team:
        """The team now: created by this plan, or as it was."""
        return self.p.built.teams.get((self.slug, slug)) or self.state.teams[slug]

    def _team_exists(self, slug: str) -> bool:
        in_file = self.spec.teams is not None and any(t.slug == slug for t in self.spec.teams)
        return in_file or (slug in self.state.teams and slug not in self.retired_teams)

    def _unknown_team(self, slug: str) -> str:
        if slug in self.retired_teams:
            return f"team {slug!r} is not in the file's teams, and --prune deletes it"
        return f"unknown team {slug!r}"

    # --- providers and their deployments ---

    def providers(self, specs: Iterable[ProviderSpec]) -> None:
        named = set()
        for spec in specs:
            named.add(spec.name)
            self.provider(spec)
        for name, rows in sorted(self.state.providers.items()):
            if name in named or not self.p.prune:
                continue
            for provider in rows:
                self.retired_deployments.update(
                    key for key, d in self.state.deployments.items() if d.provider_id == provider.pk
                )
                if provider.enabled:
                    self._disable("provider", f"{self.slug}/{name}", provider, provider_update)

    def _disable(self, kind: str, label: str, instance: Model, service: Callable[..., Any]) -> None:
        def disable() -> None:
            service(**{kind: instance}, actor=self.p.actor, changes={"enabled": False})

        fields = [FieldChange("enabled", "true", "false")]
        self.p.change("disable", kind, label, "", fields, disable)

    def provider(self, spec: ProviderSpec) -> None:
        rows = self.state.providers.get(spec.name, [])
        if len(rows) > 1:
            self.p.problem(
                spec.path,
                f"{len(rows)} providers of this organization are named {spec.name!r}; the "
                "file names providers by name: rename all but one in the dashboard first",
            )
            return
        provider = rows[0] if rows else None
        label = f"{self.slug}/{spec.name}"
        if provider is not None:
            self.p.built.providers[(self.slug, spec.name)] = provider
        current = {
            "kind": provider.kind if provider else None,
            "base_url": provider.base_url if provider else "",
            "api_version": provider.api_version if provider else "",
        }
        merged = {**current, **{k: v for k, v in spec.values.items() if k in current}}
        if merged["kind"] is None:
            self.p.problem(f"{spec.path}.kind", f"required to create provider {spec.name!r}")
        else:
            self._provider_check(spec, merged, moved=provider is None or merged != current)
        changes = _differences(provider, spec.values)
        api_key, remove_api_key = "", False
        credential = spec.credential
        if isinstance(credential, Credential):
            if provider is None:
                changes.append(FieldChange("credentials", None, f"set from ${credential.env_var}"))
                api_key = credential.value
            elif not _same_secret(provider, credential.value):
                changes.append(
                    FieldChange("credentials", "(stored)", f"changed, from ${credential.env_var}")
                )
                api_key = credential.value
        elif credential is None and provider is not None and provider.has_api_key:
            changes.append(FieldChange("credentials", "(stored)", "removed"))
            remove_api_key = True
        if provider is None:

            def create() -> None:
                created = provider_create(
                    org=self.org, actor=self.p.actor, values={"name": spec.name, **spec.values},
                    api_key=api_key,
                )  # fmt: skip
                self.p.built.providers[(self.slug, spec.name)] = created

            self.p.change("create", "provider", label, spec.path, changes, create)
        elif not changes:
            self.p.unchanged("provider", label)
        else:
            edited = {c.name: spec.values[c.name] for c in changes if c.name in spec.values}

            def update(provider: Provider = provider) -> None:
                provider_update(
                    provider=provider, actor=self.p.actor, changes=edited, api_key=api_key,
                    remove_api_key=remove_api_key,
                )  # fmt: skip

            self.p.change("update", "provider", label, spec.path, changes, update)
        if spec.deployments is not None:
            self.deployments(spec, provider)

    def _provider_check(self, spec: ProviderSpec, merged: dict[str, Any], *, moved: bool) -> None:
        """The provider model's own rules, and the SSRF check for a new address, with paths."""
        kind, base_url = merged["kind"], merged["base_url"]
        if not base_url and not default_base_url(kind):
            self.p.problem(f"{spec.path}.base_url", "this kind of provider needs a base URL")
        elif moved:
            try:
                provider_base_url_check(kind=kind, base_url=base_url)
            except ValidationError as refused:
                self.p.problem(f"{spec.path}.base_url", " ".join(refused.messages))
        if kind == Provider.Kind.AZURE and not merged["api_version"]:
            self.p.problem(f"{spec.path}.api_version", "Azure OpenAI needs an api_version")

    def deployments(self, spec: ProviderSpec, provider: Provider | None) -> None:
        assert spec.deployments is not None
        named = set()
        for deployment_spec in spec.deployments:
            named.add(deployment_spec.name)
            key = (spec.name, deployment_spec.name)
            deployment = self.state.deployments.get(key) if provider is not None else None
            self.deployment(spec.name, deployment_spec.path, deployment_spec, deployment)
        if provider is None or not self.p.prune:
            return
        for key, deployment in sorted(self.state.deployments.items()):
            if deployment.provider_id != provider.pk or deployment.name in named:
                continue
            self.retired_deployments.add(key)
            if deployment.enabled:
                label = f"{self.slug}/{key[0]}/{key[1]}"
                self._disable("deployment", label, deployment, deployment_update)

    def deployment(
        self, provider_name: str, path: str, spec: Any, deployment: Deployment | None
    ) -> None:
        label = f"{self.slug}/{provider_name}/{spec.name}"
        built_key = (self.slug, provider_name, spec.name)
        if deployment is not None:
            self.p.built.deployments[built_key] = deployment
            changes = _differences(deployment, spec.values)
            if not changes:
                self.p.unchanged("deployment", label)
                return
            edited = {change.name: spec.values[change.name] for change in changes}

            def update(deployment: Deployment = deployment) -> None:
                deployment_update(deployment=deployment, actor=self.p.actor, changes=edited)

            self.p.change("update", "deployment", label, path, changes, update)
            return
        if "upstream_model" not in spec.values:
            self.p.problem(f"{path}.upstream_model", f"required to create deployment {spec.name!r}")

        def create() -> None:
            provider = self.p.built.providers[(self.slug, provider_name)]
            created = deployment_create(
                provider=provider, actor=self.p.actor, values={"name": spec.name, **spec.values}
            )
            self.p.built.deployments[built_key] = created

        self.p.change("create", "deployment", label, path, _differences(None, spec.values), create)

    # --- routes ---

    def _deployment_keys(self) -> set[DeploymentKey]:
        """Every deployment the organization will have after the apply, and still use."""
        keys = set(self.state.deployments) - self.retired_deployments
        for provider in self.spec.providers or ():
            for deployment in provider.deployments or ():
                keys.add((provider.name, deployment.name))
        return keys

    def _resolve(self, ref: DeploymentRef, keys: set[DeploymentKey]) -> DeploymentKey | None:
        if ref.provider is not None:
            key = (ref.provider, ref.name)
            if key in keys:
                return key
            message = f"unknown deployment {ref.name!r} of provider {ref.provider!r}"
        else:
            found = sorted(key for key in keys if key[1] == ref.name)
            if len(found) == 1:
                return found[0]
            if found:
                providers = ", ".join(provider for provider, _ in found)
                self.p.problem(
                    ref.path,
                    f"deployments named {ref.name!r} exist at providers {providers}: write "
                    f"{{provider: ..., deployment: {ref.name}}}",
                )
                return None
            message = f"unknown deployment {ref.name!r}"
        if any(key[1] == ref.name for key in self.retired_deployments):
            message += " (it is not in the file, and --prune disables it)"
        self.p.problem(ref.path, message)
        return None

    def _deployment(self, key: DeploymentKey) -> Deployment:
        return self.p.built.deployments.get((self.slug, *key)) or self.state.deployments[key]

    def routes(self, specs: tuple[RouteSpec, ...]) -> None:
        twice = sorted(name for name, rows in self.state.providers.items() if len(rows) > 1)
        if twice:
            # Deployments are named within their provider: these would be ambiguous.
            self.p.problem(
                f"{self.spec.path}.routes",
                f"several providers of this organization are named {twice[0]!r}; rename all "
                "but one in the dashboard before the file manages routes",
            )
            return
        named = {spec.model_name for spec in specs}
        if self.p.prune:
            self.retired_routes = set(self.state.routes) - named
        known = (
            named
            | {name for name, route in self.state.routes.items() if name not in self.retired_routes}
            | self.p.global_route_names()
        )
        keys = self._deployment_keys()
        shown = _KeyNames(keys | set(self.state.deployments))
        for spec in specs:
            self.route(spec, keys, known, shown)
        for name in sorted(self.retired_routes):
            route = self.state.routes[name]
            if route.enabled:
                self._disable("route", f"{self.slug}/{name}", route, route_update)

    def route(
        self, spec: RouteSpec, keys: set[DeploymentKey], known: set[str], shown: "_KeyNames"
    ) -> None:
        for index, name in enumerate(spec.values.get("fallback_models", [])):
            if name not in known:
                message = f"unknown route {name!r}"
                if name in self.retired_routes:
                    message += " (it is not in the file, and --prune disables it)"
                self.p.problem(f"{spec.path}.fallbacks[{index}]", message)
        wanted_keys = None
        if spec.deployments is not None:
            resolved = [self._resolve(ref, keys) for ref in spec.deployments]
            if any(key is None for key in resolved):
                return
            wanted_keys = [key for key in resolved if key is not None]
        refs: dict[str, DeploymentKey | None] = {}
        for name, ref in spec.refs.items():
            if ref is None:
                refs[name] = None
                continue
            key = self._resolve(ref, keys)
            if key is None:
                return
            refs[name] = key
        route = self.state.routes.get(spec.model_name)
        label = f"{self.slug}/{spec.model_name}"
        fields = [
            FieldChange("fallbacks" if c.name == "fallback_models" else c.name, c.old, c.new)
            for c in _differences(route, spec.values)
        ]
        current_keys = self.state.route_deployment_keys(route) if route else set()
        deployments_changed = wanted_keys is not None and set(wanted_keys) != current_keys
        if deployments_changed:
            assert wanted_keys is not None
            old = None if route is None else shown.names(sorted(current_keys))
            fields.append(FieldChange("deployments", old, shown.names(sorted(set(wanted_keys)))))
        for name, key in refs.items():
            current = getattr(route, name) if route else None
            current_key = deployment_key(current) if current is not None else None
            if route is None or current_key != key:
                old = None if route is None else shown.name(current_key)
                fields.append(FieldChange(name, old, shown.name(key)))
        changed = {change.name for change in fields} | (
            {"fallback_models"} if "fallbacks" in {change.name for change in fields} else set()
        )

        def values() -> dict[str, Any]:
            """The fields to write; deployments are looked up now: some are new."""
            chosen = {k: v for k, v in spec.values.items() if route is None or k in changed}
            for name, key in refs.items():
                if route is None or name in changed:
                    chosen[name] = None if key is None else self._deployment(key)
            return chosen

        if route is None:
            if wanted_keys is None:
                self.p.problem(
                    f"{spec.path}.deployments", f"required to create route {spec.model_name!r}"
                )
                return

            def create(wanted: list[DeploymentKey] = wanted_keys) -> None:
                route_create(
                    org=self.org, actor=self.p.actor,
                    values={"model_name": spec.model_name, **values()},
                    deployments=[self._deployment(key) for key in wanted],
                )  # fmt: skip

            self.p.change("create", "route", label, spec.path, fields, create)
        elif not fields:
            self.p.unchanged("route", label)
        else:
            wanted = wanted_keys if deployments_changed else None

            def update(route: Route = route) -> None:
                route_update(
                    route=route, actor=self.p.actor, changes=values(),
                    deployments=None if wanted is None else [self._deployment(k) for k in wanted],
                )  # fmt: skip

            self.p.change("update", "route", label, spec.path, fields, update)

    # --- prices ---

    def prices(self, specs: Iterable[PriceSpec]) -> None:
        named = set()
        for spec in specs:
            named.add((spec.provider_kind, spec.model))
            self.price(spec)
        if not self.p.prune:
            return
        for (kind, model), price in sorted(self.state.prices.items()):
            if (kind, model) in named:
                continue

            def end(price: Any = price) -> None:
                price_override_end(price=price, actor=self.p.actor, now=self.p.now)

            self.p.change("end", "price", f"{self.slug}/{kind}/{model}", "", [], end)

    def price(self, spec: PriceSpec) -> None:
        price = self.state.prices.get((spec.provider_kind, spec.model))
        label = f"{self.slug}/{spec.provider_kind}/{spec.model}"
        if price is None:
            for name in ("input_usd_per_mtok", "output_usd_per_mtok"):
                if name not in spec.values:
                    self.p.problem(f"{spec.path}.{name}", f"required to create price {label}")
        rates = {
            name: spec.values.get(name, getattr(price, name) if price else None)
            for name in PRICE_RATE_FIELDS
        }
        changes = _differences(price, {k: v for k, v in rates.items() if k in spec.values})
        if price is not None and not changes:
            self.p.unchanged("price", label)
            return

        def set_rates() -> None:
            price_override_set(
                org=self.org, provider_kind=spec.provider_kind, model=spec.model, rates=rates,
                actor=self.p.actor, now=self.p.now,
            )  # fmt: skip

        action = "create" if price is None else "update"
        self.p.change(action, "price", label, spec.path, changes, set_rates)


@dataclass(frozen=True, slots=True)
class _BudgetView:
    team: str | None
    period: str
    enforcement: str


class _KeyNames:
    """Deployment keys as a plan shows them: the name alone when it is unambiguous."""

    def __init__(self, keys: set[DeploymentKey]) -> None:
        self.counts: dict[str, int] = {}
        for _, name in keys:
            self.counts[name] = self.counts.get(name, 0) + 1

    def name(self, key: DeploymentKey | None) -> str:
        if key is None:
            return "null"
        provider, name = key
        return show(name if self.counts.get(name, 0) <= 1 else f"{provider}/{name}")

    def names(self, keys: list[DeploymentKey]) -> str:
        return "[" + ", ".join(self.name(key) for key in keys) + "]"
