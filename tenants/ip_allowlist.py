"""Per-key IP allowlists: what admins type, normalised, and the matcher the proxy holds.

A key's `allowed_ips` is a list of networks in CIDR form (IPv4 or IPv6; a bare address is
its /32 or /128); empty means the key works from anywhere. The proxy judges the client
address the ASGI server reports: the socket peer, or, when the peer is one of uvicorn's
FORWARDED_ALLOW_IPS (a trusted reverse proxy such as the documented nginx), the client
that proxy names in X-Forwarded-For.
"""

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

MAX_ALLOWED_IPS = 100

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(value: object) -> IPNetwork:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Give each network as text, e.g. 203.0.113.0/24 or 2001:db8::/32.")
    text = value.strip()
    try:
        # Host bits are dropped ("10.1.2.3/8" is 10.0.0.0/8), as firewalls read it.
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"“{text[:60]}” is not an IP address or network (e.g. 203.0.113.0/24)."
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/n is the IPv4 network a.b.c.d/(n-96)
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def ip_allowlist_normalise(values: Iterable[object]) -> list[str]:
    """The networks as canonical CIDR strings, without duplicates, IPv4 first.

    Raises ValueError with a message for people on the first entry that is not an
    address or network, or when there are more than MAX_ALLOWED_IPS.
    """
    networks = {_network(value) for value in values}
    if len(networks) > MAX_ALLOWED_IPS:
        raise ValueError(f"Give at most {MAX_ALLOWED_IPS} networks.")
    ordered = sorted(networks, key=lambda net: (net.version, net.network_address, net.prefixlen))
    return [str(network) for network in ordered]


@dataclass(frozen=True, slots=True)
class IPAllowlist:
    """A key's networks, split by IP version, ready to match client addresses."""

    v4: tuple[ipaddress.IPv4Network, ...]
    v6: tuple[ipaddress.IPv6Network, ...]

    def permits(self, address: str | None) -> bool:
        """Whether `address` (as the server reports the client) is in one of the networks."""
        if not address:
            return False  # no client address (a Unix socket): nothing to judge it by
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # no IPv6 zone
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address):
            mapped = ip.ipv4_mapped  # a dual-stack listener reports ::ffff:a.b.c.d
            if mapped is None:
                return any(ip in network for network in self.v6)
            ip = mapped
        return any(ip in network for network in self.v4)


def ip_allowlist_compile(stored: object) -> IPAllowlist | None:
    """The matcher for a key's stored networks; None when it has none (any address).

    Never raises: an entry that is not a network (a row written around the services)
    is skipped, and a list with no valid entry permits no address, never every one.
    """
    if not stored:
        return None
    networks = []
    for value in stored if isinstance(stored, list) else []:
        try:
            networks.append(_network(value))
        except ValueError:
            continue
    return IPAllowlist(
        v4=tuple(net for net in networks if isinstance(net, ipaddress.IPv4Network)),
        v6=tuple(net for net in networks if isinstance(net, ipaddress.IPv6Network)),
    )
