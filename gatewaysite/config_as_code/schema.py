"""The configuration file's format, read into specs; every problem is reported with its path.

Objects are named by natural keys (an organization's slug, a team's slug, a provider's
name, a deployment's name within its provider, a route's model name, a price's provider
kind and model). A field left out of an object keeps its current value (or gets its
default on a new object); a list of objects left out of an organization is not managed
by the file at all. References between objects (a route's deployments, a budget's team,
fallbacks) are checked against the database too, in `plan`.
"""

import difflib
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug

from billing.budget_counters import MAX_NANOS
from billing.pricing import NANOS_PER_USD
from routing.api.providers import API_KEY_MAX_LENGTH
from routing.models import Provider, Route, validate_base_url
from tenants.api.fields import MAX_INT
from tenants.models import Budget

from .loader import ENV_NAME, EnvProblem, Problem, env_interpolate, env_reference_name, env_value

FORMAT_VERSION = 1
MAX_ROUTE_DEPLOYMENTS = 100
MAX_FALLBACKS = 20
DEFAULT_SOFT_THRESHOLDS = (50, 80, 100)


class Unset(Enum):
    """A field the file leaves out (as opposed to one it sets to null)."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class Credential:
    """A provider's API key, read from the environment variable `env_var`."""

    env_var: str
    value: str = field(repr=False)  # never printed


@dataclass(frozen=True, slots=True)
class DeploymentRef:
    """A route's reference to a deployment: by name, or by provider and name."""

    path: str
    name: str
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    path: str
    name: str
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    path: str
    name: str
    values: dict[str, Any]
    credential: Credential | None | Unset
    deployments: tuple[DeploymentSpec, ...] | None


@dataclass(frozen=True, slots=True)
class RouteSpec:
    path: str
    model_name: str
    values: dict[str, Any]
    deployments: tuple[DeploymentRef, ...] | None
    # variant_deployment / shadow_deployment, when given (None: cleared).
    refs: dict[str, DeploymentRef | None]


@dataclass(frozen=True, slots=True)
class TeamSpec:
    path: str
    slug: str
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    path: str
    team: str | None  # None: the organization's own budget
    period: str
    enforcement: str
    values: dict[str, Any]  # limit_nanos, and soft_thresholds when given


@dataclass(frozen=True, slots=True)
class PriceSpec:
    path: str
    provider_kind: str
    model: str
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OrganizationSpec:
    path: str
    slug: str
    values: dict[str, Any]
    teams: tuple[TeamSpec, ...] | None
    budgets: tuple[BudgetSpec, ...] | None
    providers: tuple[ProviderSpec, ...] | None
    routes: tuple[RouteSpec, ...] | None
    prices: tuple[PriceSpec, ...] | None


@dataclass(frozen=True, slots=True)
class ConfigFile:
    organizations: tuple[OrganizationSpec, ...]


# --- Field checks: each returns the value to use or raises _Bad with a message ---


class _Bad(Exception):
    pass


Check = Callable[[Any], Any]


def _text(max_length: int, *, blank: bool = False) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad("expected text")
        if not blank and not value.strip():
            raise _Bad("must not be blank")
        if len(value) > max_length:
            raise _Bad(f"at most {max_length} characters")
        return value

    return check


def _integer(minimum: int, maximum: int = MAX_INT, *, null: bool = False) -> Check:
    def check(value: Any) -> int | None:
        if value is None and null:
            return None
        # bool is an int in Python; `true` is no number of tokens.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("expected a whole number" + (" or null" if null else ""))
        if not minimum <= value <= maximum:
            raise _Bad(f"must be from {minimum} to {maximum}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("expected true or false")
    return value


def _choice(choices: Iterable[str]) -> Check:
    allowed = list(choices)

    def check(value: Any) -> str:
        if value not in allowed:
            raise _Bad("expected one of: " + ", ".join(allowed))
        return str(value)

    return check


def _slug(value: Any) -> str:
    value = _text(64)(value)
    try:
        validate_slug(value)
    except ValidationError:
        raise _Bad("letters, digits, hyphens and underscores only") from None
    return value


def _time_zone(value: Any) -> str:
    value = _text(64)(value)
    if value not in zoneinfo.available_timezones():
        raise _Bad(f"{value!r} is not a known IANA time zone (e.g. Europe/Berlin)")
    return value


def _decimal(value: Any) -> Decimal:
    # Quoted text or a plain number (read exactly, see loader); never a float.
    if isinstance(value, bool):
        raise _Bad("expected a number")
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise _Bad('expected a number such as "0.15"') from None
        if number.is_finite():
            return number
    raise _Bad('expected a number such as "0.15"')


def _rate(*, null: bool) -> Check:
    """USD per million tokens as the price table holds it: >= 0, 6 places, 8 digits before."""

    def check(value: Any) -> Decimal | None:
        if value is None and null:
            return None
        rate = _decimal(value)
        if rate < 0:
            raise _Bad("must not be negative")
        if rate != rate.quantize(Decimal("0.000001")) or rate >= Decimal(10**8):
            raise _Bad("at most 6 decimal places and below 100000000")
        return rate

    return check


def _usd_nanos(value: Any) -> int:
    """A budget limit in dollars (at most 9 places), as integer nano-USD."""
    usd = _decimal(value)
    nanos = usd * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise _Bad("at most 9 decimal places (a nano-dollar)")
    if not 0 < nanos < MAX_NANOS:
        raise _Bad(f"must be above 0 and below {Decimal(MAX_NANOS) / NANOS_PER_USD:f}")
    return int(nanos)


def _thresholds(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _Bad("expected a list of whole percentages")
    if len(value) > 100:
        raise _Bad("at most 100 thresholds")
    percent = _integer(1, 100)
    checked = [percent(item) for item in value]
    if len(set(checked)) != len(checked):
        raise _Bad("a threshold is given twice")
    return checked


_LIMIT = _integer(1, null=True)
_KINDS = [kind.value for kind in Provider.Kind]

ORGANIZATION_FIELDS: dict[str, Check] = {
    "name": _text(200),
    "time_zone": _time_zone,
    "log_request_bodies": _boolean,
    "rpm_limit": _LIMIT,
    "tpm_limit": _LIMIT,
}
TEAM_FIELDS: dict[str, Check] = {"name": _text(200), "rpm_limit": _LIMIT, "tpm_limit": _LIMIT}
PROVIDER_FIELDS: dict[str, Check] = {
    "kind": _choice(_KINDS),
    "base_url": _text(500, blank=True),
    "api_version": _text(32, blank=True),
    "enabled": _boolean,
}
DEPLOYMENT_FIELDS: dict[str, Check] = {
    "upstream_model": _text(200),
    "weight": _integer(0),
    "priority": _integer(0),
    "connect_timeout_ms": _integer(1),
    "ttft_timeout_ms": _integer(1),
    "read_timeout_ms": _integer(1),
    "total_timeout_ms": _integer(1),
    "context_window_tokens": _LIMIT,
    "rpm_limit": _LIMIT,
    "tpm_limit": _LIMIT,
    "enabled": _boolean,
}
ROUTE_FIELDS: dict[str, Check] = {
    "strategy": _choice(Route.Strategy.values),
    "max_attempts": _integer(1, 32767),
    "deadline_ms": _integer(1),
    "max_output_tokens": _LIMIT,
    "variant_percent": _integer(0, 100),
    "variant_sticky_by": _choice(Route.StickyBy.values),
    "shadow_percent": _integer(0, 100),
    "cache_ttl_seconds": _integer(0),
    "cache_hit_billing": _choice(Route.CacheBilling.values),
    "unsupported_params": _choice(Route.UnsupportedParams.values),
    "enabled": _boolean,
}
ROUTE_REFS = ("variant_deployment", "shadow_deployment")
PRICE_FIELDS: dict[str, Check] = {
    "input_usd_per_mtok": _rate(null=False),
    "output_usd_per_mtok": _rate(null=False),
    "cached_input_usd_per_mtok": _rate(null=True),
    "reasoning_usd_per_mtok": _rate(null=True),
}
_ORG_LISTS = ("teams", "budgets", "providers", "routes", "prices")


def config_file_read(raw: Any, *, env: Mapping[str, str]) -> tuple[ConfigFile, list[Problem]]:
    """Read a parsed YAML document into specs, with every problem found (empty when valid).

    Environment references are resolved from `env`: an unset variable is a problem
    naming it. Nothing here reads the database.
    """
    reader = _Reader(env)
    document = reader.document(raw)
    return document, reader.problems


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    # --- structure ---

    def mapping(self, raw: Any, path: str, allowed: Iterable[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.problem(path, "expected a mapping of fields")
            return None
        known = list(allowed)
        for key in raw:
            if not isinstance(key, str) or key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(_join(path, str(key)), f"unknown field{hint}")
        return raw

    def items(self, raw: Any, path: str) -> list[Any]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem(path, "expected a list")
            return []
        return raw

    def fields(self, raw: dict[str, Any], path: str, checks: Mapping[str, Check]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, check in checks.items():
            if name not in raw:
                continue
            try:
                values[name] = check(raw[name])
            except _Bad as bad:
                self.problem(_join(path, name), str(bad))
        return values

    def key(self, raw: dict[str, Any], path: str, name: str, check: Check) -> Any:
        """A required natural key; None (and a problem) when missing or malformed."""
        if name not in raw:
            self.problem(_join(path, name), "required")
            return None
        try:
            return check(raw[name])
        except _Bad as bad:
            self.problem(_join(path, name), str(bad))
            return None

    def unique(self, path: str, key: Any, seen: dict[Any, str], what: str) -> bool:
        if key in seen:
            self.problem(path, f"{what} is given twice (also at {seen[key]})")
            return False
        seen[key] = path
        return True

    # --- the document ---

    def document(self, raw: Any) -> ConfigFile:
        if raw is None:
            self.problem("", "the file is empty")
            return ConfigFile(organizations=())
        if isinstance(raw, dict) and "model_list" in raw:
            self.problem("", "this is a LiteLLM config: use manage.py config import-litellm")
            return ConfigFile(organizations=())
        top = self.mapping(raw, "", ["version", "organizations"])
        if top is None:
            return ConfigFile(organizations=())
        version = top.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            self.problem("version", f"this Tollgate reads version {FORMAT_VERSION}")
        if "organizations" not in top:
            self.problem("organizations", "required: the organizations the file configures")
        orgs: list[OrganizationSpec] = []
        seen: dict[Any, str] = {}
        for index, item in enumerate(self.items(top.get("organizations"), "organizations")):
            org = self.organization(item, f"organizations[{index}]")
            if org is not None and self.unique(
                org.path, org.slug, seen, f"organization {org.slug!r}"
            ):
                orgs.append(org)
        return ConfigFile(organizations=tuple(orgs))

    def organization(self, raw: Any, path: str) -> OrganizationSpec | None:
        given = self.mapping(raw, path, ["slug", *ORGANIZATION_FIELDS, *_ORG_LISTS])
        if given is None:
            return None
        slug = self.key(given, path, "slug", _slug)
        values = self.fields(given, path, ORGANIZATION_FIELDS)
        lists: dict[str, Any] = {}
        for name, read in (
            ("teams", self.team),
            ("budgets", self.budget),
            ("providers", self.provider),
            ("routes", self.route),
            ("prices", self.price),
        ):
            if name not in given:
                lists[name] = None  # not managed by this file
                continue
            specs = []
            seen: dict[Any, str] = {}
            for index, item in enumerate(self.items(given[name], _join(path, name))):
                spec = read(item, f"{_join(path, name)}[{index}]")
                if spec is not None and self.unique(spec.path, _identity(spec), seen, _what(spec)):
                    specs.append(spec)
            lists[name] = tuple(specs)
        if slug is None:
            return None
        return OrganizationSpec(path=path, slug=slug, values=values, **lists)

    def team(self, raw: Any, path: str) -> TeamSpec | None:
        given = self.mapping(raw, path, ["slug", *TEAM_FIELDS])
        if given is None:
            return None
        slug = self.key(given, path, "slug", _slug)
        values = self.fields(given, path, TEAM_FIELDS)
        return None if slug is None else TeamSpec(path=path, slug=slug, values=values)

    def budget(self, raw: Any, path: str) -> BudgetSpec | None:
        allowed = ["scope", "team", "period", "enforcement", "limit_usd", "limit_nanos"]
        given = self.mapping(raw, path, [*allowed, "soft_thresholds"])
        if given is None:
            return None
        ok = True
        team = None
        scope = given.get("scope", "team" if "team" in given else "org")
        if scope == "key":
            self.problem(
                _join(path, "scope"),
                "key budgets belong to virtual keys, which configuration files do not manage",
            )
            ok = False
        elif scope not in ("org", "team"):
            self.problem(_join(path, "scope"), "expected one of: org, team")
            ok = False
        elif scope == "team":
            team = self.key(given, path, "team", _slug)
            ok = team is not None
        elif "team" in given:
            self.problem(_join(path, "team"), "an organization budget names no team")
            ok = False
        defaults = {"period": Budget.Period.MONTHLY, "enforcement": Budget.Enforcement.HARD}
        checks = {
            "period": _choice(Budget.Period.values),
            "enforcement": _choice(Budget.Enforcement.values),
        }
        picked = self.fields(given, path, checks)
        if any(name in given and name not in picked for name in checks):
            ok = False
        chosen = {name: picked.get(name, str(default)) for name, default in defaults.items()}
        period, enforcement = chosen["period"], chosen["enforcement"]
        # A bad limit is reported here; the budget stays, so its team is still checked.
        values: dict[str, Any] = {}
        limits = [name for name in ("limit_usd", "limit_nanos") if name in given]
        if len(limits) != 1:
            self.problem(_join(path, "limit_usd"), "give the limit once: limit_usd or limit_nanos")
        else:
            check = _usd_nanos if limits[0] == "limit_usd" else _integer(1, MAX_NANOS - 1)
            try:
                values["limit_nanos"] = check(given[limits[0]])
            except _Bad as bad:
                self.problem(_join(path, limits[0]), str(bad))
        values.update(self.fields(given, path, {"soft_thresholds": _thresholds}))
        if not ok:
            return None
        return BudgetSpec(
            path=path, team=team, period=period, enforcement=enforcement, values=values
        )

    def provider(self, raw: Any, path: str) -> ProviderSpec | None:
        allowed = ["name", *PROVIDER_FIELDS, "api_key", "api_key_env", "deployments"]
        given = self.mapping(raw, path, allowed)
        if given is None:
            return None
        name = self.key(given, path, "name", _text(200))
        values = self.fields(given, path, PROVIDER_FIELDS)
        for url_field in ("base_url", "api_version"):
            if isinstance(values.get(url_field), str):
                try:
                    values[url_field] = env_interpolate(values[url_field], self.env)
                except EnvProblem as problem:
                    self.problem(_join(path, url_field), str(problem))
                    values.pop(url_field)
        if values.get("base_url"):
            try:
                validate_base_url(values["base_url"])
            except ValidationError as refused:
                self.problem(_join(path, "base_url"), " ".join(refused.messages))
        credential = self.credential(given, path)
        deployments = None
        if "deployments" in given:
            specs = []
            seen: dict[Any, str] = {}
            for index, item in enumerate(
                self.items(given["deployments"], _join(path, "deployments"))
            ):
                spec = self.deployment(item, f"{_join(path, 'deployments')}[{index}]")
                if spec is not None and self.unique(
                    spec.path, spec.name, seen, f"deployment {spec.name!r}"
                ):
                    specs.append(spec)
            deployments = tuple(specs)
        if name is None:
            return None
        return ProviderSpec(
            path=path, name=name, values=values, credential=credential, deployments=deployments
        )

    def credential(self, given: dict[str, Any], path: str) -> Credential | None | Unset:
        if "api_key" in given and "api_key_env" in given:
            self.problem(_join(path, "api_key"), "give api_key or api_key_env, not both")
            return UNSET
        if "api_key_env" in given:
            name = given["api_key_env"]
            where = _join(path, "api_key_env")
            if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
                self.problem(where, "expected the name of an environment variable")
                return UNSET
        elif "api_key" in given:
            where = _join(path, "api_key")
            if given["api_key"] is None:
                return None  # explicitly none: a stored key is removed
            reference = given["api_key"] if isinstance(given["api_key"], str) else ""
            name = env_reference_name(reference)
            if name is None:
                # Never echo the value: it may well be the secret itself.
                self.problem(
                    where,
                    "credentials come from the environment: write ${NAME} (or api_key_env: "
                    "NAME) and set NAME; a key written in the file is not accepted",
                )
                return UNSET
        else:
            return UNSET
        try:
            value = env_value(name, self.env)
        except EnvProblem as problem:
            self.problem(where, str(problem))
            return UNSET
        if len(value) > API_KEY_MAX_LENGTH:
            self.problem(where, f"the key in {name} is longer than {API_KEY_MAX_LENGTH} characters")
            return UNSET
        return Credential(env_var=name, value=value)

    def deployment(self, raw: Any, path: str) -> DeploymentSpec | None:
        given = self.mapping(raw, path, ["name", *DEPLOYMENT_FIELDS])
        if given is None:
            return None
        name = self.key(given, path, "name", _text(200))
        values = self.fields(given, path, DEPLOYMENT_FIELDS)
        return None if name is None else DeploymentSpec(path=path, name=name, values=values)

    def deployment_ref(self, raw: Any, path: str) -> DeploymentRef | None:
        if isinstance(raw, str) and raw.strip():
            return DeploymentRef(path=path, name=raw)
        if isinstance(raw, dict):
            given = self.mapping(raw, path, ["provider", "deployment"])
            if given is not None:
                provider = self.key(given, path, "provider", _text(200))
                name = self.key(given, path, "deployment", _text(200))
                if provider is not None and name is not None:
                    return DeploymentRef(path=path, name=name, provider=provider)
            return None
        self.problem(path, "expected a deployment's name, or {provider: ..., deployment: ...}")
        return None

    def route(self, raw: Any, path: str) -> RouteSpec | None:
        allowed = ["model_name", "deployments", "fallbacks", *ROUTE_FIELDS, *ROUTE_REFS]
        given = self.mapping(raw, path, allowed)
        if given is None:
            return None
        model_name = self.key(given, path, "model_name", _text(200))
        values = self.fields(given, path, ROUTE_FIELDS)
        deployments = None
        if "deployments" in given:
            where = _join(path, "deployments")
            items = self.items(given["deployments"], where)
            if len(items) > MAX_ROUTE_DEPLOYMENTS:
                self.problem(where, f"at most {MAX_ROUTE_DEPLOYMENTS} deployments")
            refs = [self.deployment_ref(item, f"{where}[{i}]") for i, item in enumerate(items)]
            deployments = tuple(ref for ref in refs if ref is not None)
        refs_given: dict[str, DeploymentRef | None] = {}
        for name in ROUTE_REFS:
            if name in given:
                ref = None
                if given[name] is not None:
                    ref = self.deployment_ref(given[name], _join(path, name))
                    if ref is None:
                        continue
                refs_given[name] = ref
        if "fallbacks" in given:
            fallbacks = self.fallbacks(given["fallbacks"], _join(path, "fallbacks"), model_name)
            if fallbacks is not None:
                values["fallback_models"] = fallbacks
        if model_name is None:
            return None
        return RouteSpec(
            path=path,
            model_name=model_name,
            values=values,
            deployments=deployments,
            refs=refs_given,
        )

    def fallbacks(self, raw: Any, path: str, model_name: str | None) -> list[str] | None:
        items = self.items(raw, path)
        if len(items) > MAX_FALLBACKS:
            self.problem(path, f"at most {MAX_FALLBACKS} fallbacks")
            return None
        names: list[str] = []
        for index, item in enumerate(items):
            where = f"{path}[{index}]"
            try:
                name = _text(200)(item)
            except _Bad as bad:
                self.problem(where, str(bad))
                return None
            if name == model_name:
                self.problem(where, "a route cannot fall back to itself")
                return None
            if name in names:
                self.problem(where, f"{name!r} is given twice")
                return None
            names.append(name)
        return names

    def price(self, raw: Any, path: str) -> PriceSpec | None:
        given = self.mapping(raw, path, ["provider_kind", "model", *PRICE_FIELDS])
        if given is None:
            return None
        kind = self.key(given, path, "provider_kind", _choice(_KINDS))
        model = self.key(given, path, "model", _text(200))
        values = self.fields(given, path, PRICE_FIELDS)
        if kind is None or model is None:
            return None
        return PriceSpec(path=path, provider_kind=kind, model=model, values=values)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _identity(spec: Any) -> Any:
    if isinstance(spec, TeamSpec):
        return spec.slug
    if isinstance(spec, BudgetSpec):
        return (spec.team, spec.period, spec.enforcement)
    if isinstance(spec, ProviderSpec):
        return spec.name
    if isinstance(spec, RouteSpec):
        return spec.model_name
    return (spec.provider_kind, spec.model)


def _what(spec: Any) -> str:
    if isinstance(spec, TeamSpec):
        return f"team {spec.slug!r}"
    if isinstance(spec, BudgetSpec):
        target = f"team {spec.team!r}" if spec.team else "the organization"
        return f"a {spec.enforcement} {spec.period} budget of {target}"
    if isinstance(spec, ProviderSpec):
        return f"provider {spec.name!r}"
    if isinstance(spec, RouteSpec):
        return f"route {spec.model_name!r}"
    return f"a price for {spec.provider_kind}/{spec.model}"
