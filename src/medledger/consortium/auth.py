"""Node-key authentication of inter-node HTTP requests.

Every request between nodes is signed by the calling organisation's Ed25519
node key (the key registered on the ledger as principal ``node:<org>``). The
signature covers, in canonical CBOR under a domain prefix::

    "medledger/peer-request/v1\\0" || encode({
        "net": network, "o": calling org, "aud": serving org,
        "m": HTTP method, "p": raw path with query string,
        "t": unix time (ms), "n": 16-byte random nonce,
        "b": SHA-256 of the body,
    })

and travels in four headers (``X-Medledger-Org``, ``-Time``, ``-Nonce``,
``-Signature``, base64). The serving node accepts a request only if

* the calling org is an active member and the signature verifies with one of
  the current keys of its ``node:<org>`` principal, read from the serving
  node's own committed ledger state (no certificate authority involved);
* it names the serving org as audience (a request cannot be replayed to
  another node) and this network;
* its time is within ``max_skew`` of the serving node's clock; and
* its (org, nonce) was not seen before within the skew window (replays of a
  captured request are refused; older ones are refused by the time check).

TLS still protects confidentiality in transit; the signature is what
authenticates the organisation, end to end.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence

from medledger.contracts.base import get_obj
from medledger.contracts.core import k_key, k_org, k_principal
from medledger.crypto.signing import SigningKey, VerifyKey
from medledger.encoding import encode
from medledger.errors import InvalidSignature, MedledgerError
from medledger.state.base import StateReader

__all__ = [
    "HEADER_NONCE",
    "HEADER_ORG",
    "HEADER_SIGNATURE",
    "HEADER_TIME",
    "PEER_DOMAIN",
    "PeerAuthError",
    "RequestVerifier",
    "current_node_keys",
    "sign_request",
    "signing_input",
]

PEER_DOMAIN = b"medledger/peer-request/v1\x00"
HEADER_ORG = "x-medledger-org"
HEADER_TIME = "x-medledger-time"
HEADER_NONCE = "x-medledger-nonce"
HEADER_SIGNATURE = "x-medledger-signature"
NONCE_SIZE = 16


class PeerAuthError(MedledgerError):
    """An inter-node request is not signed by a current member's node key."""

    code = "peer-auth"


def signing_input(
    *,
    network: str,
    org: str,
    audience: str,
    method: str,
    path: str,
    time_ms: int,
    nonce: bytes,
    body: bytes,
) -> bytes:
    """The exact bytes a node signs for one request."""
    return PEER_DOMAIN + encode(
        {
            "net": network,
            "o": org,
            "aud": audience,
            "m": method.upper(),
            "p": path,
            "t": time_ms,
            "n": nonce,
            "b": hashlib.sha256(body).digest(),
        }
    )


def sign_request(
    key: SigningKey,
    *,
    network: str,
    org: str,
    audience: str,
    method: str,
    path: str,
    body: bytes = b"",
    time_ms: int | None = None,
    nonce: bytes | None = None,
) -> dict[str, str]:
    """The authentication headers for one request of ``org`` to ``audience``'s node."""
    t = int(time.time() * 1000) if time_ms is None else time_ms
    n = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
    msg = signing_input(
        network=network,
        org=org,
        audience=audience,
        method=method,
        path=path,
        time_ms=t,
        nonce=n,
        body=body,
    )
    return {
        HEADER_ORG: org,
        HEADER_TIME: str(t),
        HEADER_NONCE: n.hex(),
        HEADER_SIGNATURE: base64.b64encode(key.sign(msg)).decode("ascii"),
    }


def current_node_keys(state: StateReader, org: str) -> list[bytes]:
    """Public keys that may sign for ``org``'s node now (empty if the org is not active)."""
    org_rec = get_obj(state, k_org(org))
    if org_rec is None or org_rec.get("status") != "active":
        return []
    principal = get_obj(state, k_principal(f"node:{org}"))
    if principal is None or principal.get("status") != "active":
        return []
    out: list[bytes] = []
    for kid_hex in principal.get("keys") or []:
        rec = get_obj(state, k_key(bytes.fromhex(kid_hex)))
        if rec is not None and rec.get("until") is None:
            out.append(rec["pub"])
    return out


KeyLookup = Callable[[str], Awaitable[Sequence[bytes]]]


class RequestVerifier:
    """Checks signed inter-node requests addressed to ``audience`` (this node's org).

    ``keys(org)`` returns the public keys currently allowed to sign for ``org``
    (normally :func:`current_node_keys` on the node's committed state).
    """

    def __init__(
        self,
        *,
        network: str,
        audience: str,
        keys: KeyLookup,
        max_skew_ms: int = 30_000,
        clock: Callable[[], int] | None = None,
        max_nonces: int = 1_000_000,
    ) -> None:
        self.network = network
        self.audience = audience
        self._keys = keys
        self.max_skew_ms = max_skew_ms
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._max_nonces = max_nonces
        # (org, nonce) -> expiry (ms); insertion order is (nearly) expiry order
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def _prune(self, now: int) -> None:
        while self._seen:
            ident, expiry = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[ident]

    async def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """Return the authenticated calling org, or raise :class:`PeerAuthError`."""
        org = headers.get(HEADER_ORG)
        t_text = headers.get(HEADER_TIME)
        n_text = headers.get(HEADER_NONCE)
        s_text = headers.get(HEADER_SIGNATURE)
        if not org or not t_text or not n_text or not s_text:
            raise PeerAuthError("request is not signed by a node key")
        try:
            t = int(t_text)
            nonce = bytes.fromhex(n_text)
            sig = base64.b64decode(s_text, validate=True)
        except (ValueError, binascii.Error):
            raise PeerAuthError("malformed request signature headers") from None
        if len(nonce) != NONCE_SIZE or len(sig) != 64 or not t_text.isdigit():
            raise PeerAuthError("malformed request signature headers")
        now = self._clock()
        if abs(now - t) > self.max_skew_ms:
            raise PeerAuthError(
                f"request time is {abs(now - t)} ms from this node's clock "
                f"(at most {self.max_skew_ms} ms accepted)"
            )
        msg = signing_input(
            network=self.network,
            org=org,
            audience=self.audience,
            method=method,
            path=path,
            time_ms=t,
            nonce=nonce,
            body=body,
        )
        keys = await self._keys(org)
        if not keys:
            raise PeerAuthError(f"{org!r} is not an active member with a node key")
        if not any(_valid(pub, sig, msg) for pub in keys):
            raise PeerAuthError(f"signature does not verify with the node key of {org!r}")
        self._prune(now)
        ident = (org, nonce)
        if ident in self._seen:
            raise PeerAuthError("replayed request (nonce already used)")
        if len(self._seen) >= self._max_nonces:
            # never forget an unexpired nonce (that would re-open the replay window)
            raise PeerAuthError("too many requests in the replay window; try again later")
        self._seen[ident] = now + 2 * self.max_skew_ms
        return org


def _valid(pub: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        VerifyKey(pub).verify(sig, msg)
    except (InvalidSignature, MedledgerError):
        return False
    return True
