"""Outgoing webhooks: HMAC signatures, and a POST that cannot be aimed at our own network.

Signing: `X-Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
The timestamp is signed with the body, so a receiver that checks it within a
tolerance (`webhook_signature_verify`) rejects both tampered bodies and replays.

Server-side request forgery: a webhook URL is typed in by an org admin, so a
request to it must not reach loopback, private, link-local or reserved
addresses (a cloud's metadata service, Redis, the admin). The host is resolved
once, every address it resolves to is checked, and the connection goes to the
checked address (with the original Host header and TLS server name), so a DNS
answer that changes between the check and the connect (rebinding) cannot
redirect it. Redirects are never followed, and proxies from the environment
are ignored.
"""

import hashlib
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass

SIGNATURE_HEADER = "X-Tollgate-Signature"
USER_AGENT = "Tollgate-Webhooks/1"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def webhook_signature(secret: str, timestamp: int, body: bytes | str) -> str:
    """The X-Tollgate-Signature value for `body` sent at `timestamp` (Unix seconds)."""
    raw = body.encode() if isinstance(body, str) else body
    signed = f"{int(timestamp)}.".encode() + raw
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={int(timestamp)},v1={digest}"


def webhook_signature_verify(
    secret: str,
    header: str,
    body: bytes | str,
    *,
    tolerance_s: int = 300,
    now: float | None = None,
) -> bool:
    """True when `header` signs exactly `body` with `secret`, within `tolerance_s` of now.

    Give the raw request body, before any JSON parsing: re-serialised JSON differs.
    Several v1= entries are accepted (one may be signed with a newer secret).
    """
    timestamp: int | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1" and value:
            candidates.append(value.encode("utf-8", "replace"))
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = webhook_signature(secret, timestamp, body).partition(",v1=")[2].encode()
    # Compare against every candidate, so the time taken says nothing about which matched.
    matches = [hmac.compare_digest(expected, candidate) for candidate in candidates]
    return any(matches)


def host_addresses(host: str) -> set[str] | None:
    """The addresses `host` is, or resolves to now ("localhost" and its subdomains: the
    loopback ones); None for a name that does not resolve (yet). It blocks (getaddrinfo)."""
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return {"127.0.0.1", "::1"}
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError):
            return None
        return {str(info[4][0]) for info in infos}


def host_is_private(host: str) -> bool:
    """Whether `host` is, or resolves now to, an address of our own network (loopback,
    private, link-local, reserved, "localhost"). A name that does not resolve yet cannot
    be judged and counts as public: the call to it will fail, or be checked again then."""
    addresses = host_addresses(host)
    return addresses is not None and not all(address_is_public(a) for a in addresses)


def address_is_public(address: str) -> bool:
    """True for a globally routable unicast address; False for anything of our own network.

    Addresses embedding an IPv4 one (IPv4-mapped, NAT64, 6to4) are judged by it.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
    )


class WebhookRefused(Exception):
    """The URL's host resolves to an address webhooks may not reach."""


def _resolve(host: str, port: int, *, allow_private: bool) -> str:
    """One address to connect to; every address of `host` must be public unless allowed."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise socket.gaierror("no address")
    if not allow_private:
        for address in addresses:
            if not address_is_public(address):
                # Which address stays unsaid: it would map our internal names for the sender.
                raise WebhookRefused("the host resolves to a non-public address")
    return addresses[0]


@dataclass(frozen=True, slots=True)
class WebhookResult:
    # The receiver's HTTP status (None when no response came).
    status: int | None
    # Why it failed, in a few words without the URL; "" when delivered.
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and not self.error


def webhook_post(
    url: str,
    body: bytes,
    *,
    headers: dict[str, str],
    allow_private: bool,
    timeout_s: float = 10.0,
) -> WebhookResult:
    """POST `body` (JSON) to `url` once; a 2xx answer is a delivery. Never raises for I/O."""
    # Imported here: httpx (with its CLI's rich and pygments) is ~7 MB that a proxy
    # worker, which never sends a webhook unless it is the embedded default, can skip.
    import httpx

    target = httpx.URL(url)
    if target.scheme not in {"http", "https"} or not target.host:
        return WebhookResult(None, "not an http(s) URL")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        address = _resolve(target.host, port, allow_private=allow_private)
    except WebhookRefused as exc:
        return WebhookResult(None, f"refused: {exc}")
    except (OSError, UnicodeError):
        return WebhookResult(None, "the host name did not resolve")
    pinned = target.copy_with(host=address)
    request_headers = {
        "Host": target.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **headers,
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "POST", pinned, content=body, headers=request_headers, extensions=extensions
            ) as response,
        ):
            # The body is never read: a receiver cannot make us hold a large answer.
            status = response.status_code
    except httpx.TimeoutException:
        return WebhookResult(None, f"timed out after {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return WebhookResult(None, f"connection failed ({type(exc).__name__})")
    if 300 <= status < 400:
        return WebhookResult(status, f"HTTP {status}: redirects are not followed")
    if not 200 <= status < 300:
        return WebhookResult(status, f"HTTP {status}")
    return WebhookResult(status)
