"""Where upstream calls may connect: never our own network unless the operator allows it.

An org admin chooses a provider's base URL, so a tenant chooses where the gateway
connects from inside our network (server-side request forgery). The save-time check
(`routing.services.provider_base_url_check`) judges the URL once; this module judges
the address every new upstream connection actually goes to:

- host names: `GuardedResolver` wraps aiohttp's resolver and drops each forbidden
  address it returns; with none left the connection fails (`AddressForbidden`).
  aiohttp connects only to the addresses its resolver returns and caches only those,
  so a name that resolves somewhere else after it was saved (DNS rebinding, an old
  row) is judged again at every lookup.
- literal addresses, which aiohttp never hands to a resolver: `guarded_socket_factory`
  (the connector's socket factory) refuses to open a socket to a forbidden address. It
  sees every address a connection is made to, so it also backs up the resolver.

Forbidden: anything that is not a globally routable unicast address (loopback, private,
link-local, unique-local, CGNAT, reserved, multicast, unspecified such as 0.0.0.0),
judged by the IPv4 address inside IPv4-mapped, NAT64 and 6to4 ones. An operator allows
more with TOLLGATE_PROVIDER_ALLOWED_NETWORKS (CIDRs) or all of it with
TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS (local vLLM, Ollama, the mock provider); cloud
metadata services stay refused under that switch and are reached only when listed.

Both checks run once per new connection: requests on a pooled keep-alive connection
cost nothing more.
"""

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from django.conf import settings

from billing.webhooks import address_is_public, host_addresses

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddrInfo = tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Cloud instance metadata (AWS, GCP, Azure, OpenStack; AWS's IPv6 one; ECS task
# credentials; Alibaba): refused even where private networks are allowed.
_METADATA = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)


class AddressForbidden(OSError):
    """A connection would go to an address upstream calls may not reach."""


def _plain(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), else `ip` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Which addresses upstream connections may go to, beyond public ones."""

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def permits(self, address: str) -> bool:
        """Whether a connection may go to `address` (an IP address, as sockets see it)."""
        try:
            ip = _plain(ipaddress.ip_address(address.split("%", 1)[0]))  # no IPv6 zone
        except ValueError:
            return False
        if any(ip in network for network in self.allowed_networks):
            return True
        if ip in _METADATA:
            return False
        return self.allow_private or address_is_public(str(ip))


def allowed_networks_parse(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) as networks; ValueError names the first bad one."""
    networks = []
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a network (e.g. 10.0.0.0/8)") from None
        if network.version == 6 and network.prefixlen >= 96:
            mapped = ipaddress.IPv6Address(int(network.network_address)).ipv4_mapped
            if mapped is not None:  # ::ffff:a.b.c.d/n: the IPv4 network it maps
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def egress_policy() -> EgressPolicy:
    """The operator's policy, from settings as they are now."""
    return EgressPolicy(
        allow_private=bool(settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS),
        allowed_networks=allowed_networks_parse(settings.TOLLGATE_PROVIDER_ALLOWED_NETWORKS),
    )


def host_permitted(host: str, policy: EgressPolicy) -> bool:
    """Whether every address `host` is (or resolves to now) is one `policy` permits.

    For saving a base URL: it blocks (getaddrinfo). A name that does not resolve yet
    cannot be judged and passes: the connection to it is judged when it is made.
    """
    addresses = host_addresses(host)
    return addresses is None or all(policy.permits(address) for address in addresses)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, returning only the addresses `policy` permits."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The permitted addresses of `host`; AddressForbidden when there are none."""
        resolved = await self._inner.resolve(host, port, family)
        permitted = [result for result in resolved if self._policy.permits(result["host"])]
        if not permitted:
            # For the operator: which name, and what it resolved to. The client is
            # told only that the address is not allowed (routing/providers/upstream.py).
            logger.warning(
                "Upstream connection to %s refused: it resolves only to addresses upstream "
                "calls may not reach (%s); see TOLLGATE_PROVIDER_ALLOWED_NETWORKS",
                host,
                ", ".join(sorted({result["host"] for result in resolved})),
            )
            raise AddressForbidden(f"{host} resolves only to forbidden addresses")
        return permitted

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket_factory(policy: EgressPolicy) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory for aiohttp's connector that refuses forbidden addresses."""

    def open_socket(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, address = addr_info
        if not policy.permits(address[0]):
            logger.warning(
                "Upstream connection to %s refused: upstream calls may not reach it; "
                "see TOLLGATE_PROVIDER_ALLOWED_NETWORKS",
                address[0],
            )
            raise AddressForbidden(f"{address[0]} is a forbidden address")
        return socket.socket(family=family, type=type_, proto=proto)

    return open_socket
