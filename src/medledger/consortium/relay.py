"""Relaying: one member's node proposes the transactions every node receives.

The etcd orderer can hand the transactions a node receives to another node, which
proposes them with its own (see "Relaying" in :mod:`medledger.orderer.etcd`):
every proposal costs every node a block, so one proposer for the consortium makes
fewer, larger blocks than one per node. :class:`PeerRelay` is the node process's
:class:`~medledger.orderer.etcd.Relay`, with ``relay = true`` in its ``[orderer_options]``
(off by default: near saturation the one proposer's pipeline is the bottleneck):

* **Who proposes.** The first organisation, in sorted order, of this node and the
  members' nodes that gossip has not found unreachable or divergent, so every
  healthy node picks the same one.
* **How transactions get there.** Over one WebSocket per proposer
  (``/peer/v1/relay`` of its peer API; the opening handshake is signed with this
  node's key like every peer request, over TLS when the peer URL is https). Each
  binary message is a CBOR array of signed transactions; the proposer answers
  every message, in order, with ``{"queued", "revision"}`` once it has queued them,
  or ``{"error", "message", "status"}`` when it refused them (that message alone
  fails). Messages are sent without
  waiting for the previous answer, in the order :meth:`PeerRelay.forward` was
  called: one TCP stream keeps them in that order, and the proposer queues them
  in it. A broken or silent connection fails every message not yet answered (the
  orderer then proposes those transactions itself); the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from medledger.consortium.auth import sign_request
from medledger.consortium.client import PeerClient, PeerRequestError, PeerUnavailable
from medledger.consortium.gossip import ConsortiumMonitor
from medledger.encoding import decode, encode
from medledger.errors import EncodingError

__all__ = ["RELAY_PATH", "PeerRelay"]

log = logging.getLogger("medledger.consortium.relay")

RELAY_PATH = "/peer/v1/relay"
#: the largest relay message accepted either way (a proposal's worth, with room)
MAX_MESSAGE = 4 * 1024 * 1024


class PeerRelay:
    """Relay to the first healthy member node in organisation order, over WebSockets."""

    def __init__(self, client: PeerClient, monitor: ConsortiumMonitor, wait: float = 5.0) -> None:
        self.client = client
        self.monitor = monitor
        self.wait = wait
        self._links: dict[str, _Link] = {}

    def proposers(self) -> list[str]:
        eligible = [self.client.org]
        for org in self.client.peers:
            state = self.monitor.peers.get(org)
            if state is not None and (state.reachable is False or state.divergence is not None):
                continue
            eligible.append(org)
        return sorted(eligible)

    async def forward(self, org: str, raws: Sequence[bytes]) -> int:
        link = self._links.get(org)
        if link is None or link.broken is not None:
            link = self._links[org] = _Link(self.client, org)
        return await link.send(raws, self.wait)

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close(PeerUnavailable("the relay is closing"))


class _Link:
    """One WebSocket to a proposer's node: messages sent in call order, answered in order."""

    def __init__(self, client: PeerClient, org: str) -> None:
        self.client = client
        self.org = org
        self.broken: Exception | None = None
        self._outbox: asyncio.Queue[tuple[bytes, asyncio.Future[int]]] = asyncio.Queue()
        self._waiting: collections.deque[asyncio.Future[int]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    async def send(self, raws: Sequence[bytes], wait: float) -> int:
        if self.broken is not None:
            raise self.broken
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((encode(list(raws)), fut))  # the order of the calls
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"medledger-relay-{self.org}")
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(fut)
        except TimeoutError:
            await self.close(PeerUnavailable(f"node of {self.org!r} did not answer a relay"))
            assert self.broken is not None
            raise self.broken from None

    async def close(self, why: Exception) -> None:
        if self.broken is None:
            self.broken = why
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_all()

    def _fail_all(self) -> None:
        assert self.broken is not None
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(self.broken)
        while not self._outbox.empty():
            _, fut = self._outbox.get_nowait()
            if not fut.done():
                fut.set_exception(self.broken)

    async def _run(self) -> None:
        try:
            async with await self._connect() as ws:
                reader = asyncio.create_task(self._read(ws))
                try:
                    while True:
                        getter = asyncio.ensure_future(self._outbox.get())
                        await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                        if reader.done():
                            getter.cancel()
                            reader.result()  # raises why it ended
                            raise PeerUnavailable(f"node of {self.org!r} closed the relay")
                        message, fut = getter.result()
                        self._waiting.append(fut)
                        await ws.send(message)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
        except asyncio.CancelledError:
            raise
        except (PeerUnavailable, PeerRequestError) as exc:
            self.broken = self.broken or exc
        except (OSError, WebSocketException, TimeoutError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            self.broken = self.broken or PeerUnavailable(f"relay to {self.org!r} failed: {what}")
        except Exception as exc:  # never leave a caller waiting
            log.exception("relay to %s failed", self.org)
            self.broken = self.broken or PeerUnavailable(f"relay to {self.org!r} failed: {exc}")
        finally:
            if self.broken is None:
                self.broken = PeerUnavailable(f"relay to {self.org!r} ended")
            self._fail_all()

    async def _connect(self) -> Any:
        client = self.client
        if self.org not in client.peers:
            raise PeerUnavailable(f"no address known for the node of {self.org!r}")
        base = client.peers[self.org]
        url = "ws" + base[4:] + RELAY_PATH if base.startswith("http") else base + RELAY_PATH
        headers = sign_request(
            client.key,
            network=client.network,
            org=client.org,
            audience=self.org,
            method="GET",
            path=RELAY_PATH,
        )
        tls: ssl.SSLContext | None = None
        if url.startswith("wss:"):
            verify = client.verify
            tls = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
            if verify is False:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return connect(
            url,
            additional_headers=headers,
            ssl=tls,
            max_size=MAX_MESSAGE,
            open_timeout=client.timeout,
            compression=None,
        )

    async def _read(self, ws: ClientConnection) -> None:
        async for message in ws:
            if not self._waiting:
                raise PeerUnavailable(f"node of {self.org!r} answered a relay nobody sent")
            fut = self._waiting.popleft()
            try:
                doc = decode(message if isinstance(message, bytes) else message.encode())
            except EncodingError:
                doc = None
            if isinstance(doc, dict) and "error" in doc:
                refused = PeerRequestError(
                    f"node of {self.org!r} refused a relay: {doc.get('message')}",
                    status=int(doc.get("status", 400)),
                    error=str(doc["error"]),
                )
                if not fut.done():
                    fut.set_exception(refused)
                continue  # each message is answered on its own
            rev = doc.get("revision") if isinstance(doc, dict) else None
            if not isinstance(rev, int) or isinstance(rev, bool) or rev < 0:
                self.broken = PeerUnavailable(f"node of {self.org!r} sent a malformed relay answer")
                fut.set_exception(self.broken)
                raise self.broken
            if not fut.done():
                fut.set_result(rev)
