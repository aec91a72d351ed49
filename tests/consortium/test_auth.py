"""Node-key signatures on inter-node requests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from medledger.consortium.auth import (
    HEADER_SIGNATURE,
    HEADER_TIME,
    PeerAuthError,
    RequestVerifier,
    current_node_keys,
    sign_request,
)
from medledger.contracts import core
from medledger.contracts.base import get_obj
from medledger.crypto.signing import SigningKey
from medledger.encoding import encode
from medledger.state.base import MemoryState

from .conftest import genesis_doc, make_orgs

NOW = 1_800_000_000_000


class Keys:
    def __init__(self, keys: dict[str, list[bytes]]) -> None:
        self.keys = keys

    async def __call__(self, org: str) -> Sequence[bytes]:
        return self.keys.get(org, [])


def verifier(keys: dict[str, list[bytes]], now: list[int], **kw: int) -> RequestVerifier:
    return RequestVerifier(
        network="net", audience="org-2", keys=Keys(keys), clock=lambda: now[0], **kw
    )


def signed(key: SigningKey, **over: object) -> dict[str, str]:
    args: dict[str, object] = {
        "network": "net",
        "org": "org-1",
        "audience": "org-2",
        "method": "POST",
        "path": "/peer/v1/cosign?x=1",
        "body": b"hello",
        "time_ms": NOW,
    }
    args.update(over)
    return sign_request(key, **args)  # type: ignore[arg-type]


async def test_a_signed_request_verifies_once() -> None:
    key = SigningKey.generate()
    v = verifier({"org-1": [key.public.raw]}, [NOW + 5_000])
    headers = signed(key)
    assert await v.verify("post", "/peer/v1/cosign?x=1", headers, b"hello") == "org-1"
    with pytest.raises(PeerAuthError, match="replayed"):
        await v.verify("POST", "/peer/v1/cosign?x=1", headers, b"hello")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/peer/v1/cosign?x=1", b"hello"),
        ("POST", "/peer/v1/cosign?x=2", b"hello"),
        ("POST", "/peer/v1/cosign?x=1", b"hellO"),
    ],
)
async def test_any_change_breaks_the_signature(method: str, path: str, body: bytes) -> None:
    key = SigningKey.generate()
    v = verifier({"org-1": [key.public.raw]}, [NOW])
    with pytest.raises(PeerAuthError, match="does not verify"):
        await v.verify(method, path, signed(key), body)


async def test_audience_network_and_key_are_bound() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    v = verifier({"org-1": [key.public.raw]}, [NOW])
    for headers in (signed(key, audience="org-3"), signed(key, network="other"), signed(other)):
        with pytest.raises(PeerAuthError, match="does not verify"):
            await v.verify("POST", "/peer/v1/cosign?x=1", headers, b"hello")
    # an org that is not an active member (no current node key) is refused
    with pytest.raises(PeerAuthError, match="not an active member"):
        await v.verify("POST", "/peer/v1/cosign?x=1", signed(key, org="org-9"), b"hello")


async def test_clock_skew_is_bounded() -> None:
    key = SigningKey.generate()
    now = [NOW + 30_001]
    v = verifier({"org-1": [key.public.raw]}, now)
    with pytest.raises(PeerAuthError, match="from this node's clock"):
        await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello")
    now[0] = NOW - 30_001
    with pytest.raises(PeerAuthError, match="from this node's clock"):
        await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello")
    now[0] = NOW - 30_000
    assert await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello") == "org-1"


async def test_missing_or_malformed_headers() -> None:
    key = SigningKey.generate()
    v = verifier({"org-1": [key.public.raw]}, [NOW])
    with pytest.raises(PeerAuthError, match="not signed"):
        await v.verify("GET", "/", {}, b"")
    for name, value in ((HEADER_TIME, "+1"), (HEADER_SIGNATURE, "***"), (HEADER_TIME, "x")):
        headers = signed(key)
        headers[name] = value
        with pytest.raises(PeerAuthError, match="malformed"):
            await v.verify("POST", "/peer/v1/cosign?x=1", headers, b"hello")


async def test_replay_cache_is_bounded_without_forgetting() -> None:
    key = SigningKey.generate()
    now = [NOW]
    v = verifier({"org-1": [key.public.raw]}, now, max_nonces=2)
    await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello")
    await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello")
    with pytest.raises(PeerAuthError, match="too many"):
        await v.verify("POST", "/peer/v1/cosign?x=1", signed(key), b"hello")
    now[0] = NOW + 60_001  # the first two nonces expired (their requests are too old now)
    assert await v.verify("POST", "/peer/v1/cosign?x=1", signed(key, time_ms=now[0]), b"hello")


def test_current_node_keys_follow_the_ledger() -> None:
    orgs = make_orgs(2)
    state = MemoryState()
    genesis = core.normalise_genesis(genesis_doc(orgs))
    state.apply(core.genesis_effects(genesis).writes)
    assert current_node_keys(state, "org-1") == [orgs[0].node_key.public.raw]
    assert current_node_keys(state, "org-9") == []
    # a removed organisation's node key no longer authenticates
    org = dict(get_obj(state, core.k_org("org-2")))
    org["status"] = "removed"
    state.apply({core.k_org("org-2"): encode(org)})
    assert current_node_keys(state, "org-2") == []
