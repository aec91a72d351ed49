"""One organisation's node process: ``medledger node start --config node.toml``.

It runs, in one asyncio process:

* the **node** on its own store (PostgreSQL or SQLite), created from the
  network's genesis on first start;
* the **orderer client** (etcd): if etcd no longer holds the history the node
  needs (compacted while it was down, or a new node), it **catches up** from
  other nodes' blocks, verifying every block, then starts ordering; the same
  happens if the orderer reports ``CatchUpRequired`` later;
* the **peer API** (blocks, checkpoints, co-signing, encrypted records for
  other organisations, transaction submission) on ``[peer] listen``;
* the **FHIR API** (:func:`medledger.api.app.create_app`) on ``[api] listen``,
  sharing the node and one transaction submitter with the peer API;
* **gossip**: checkpoint exchange and divergence detection. On divergence in the
  minority the node halts every ledger write (the shared submitter refuses,
  ``/ledger/v1/txs`` answers 503), logs CRITICAL lines, and ``/health`` (on both
  listeners) answers 503 with the details.

SIGTERM / SIGINT stop it cleanly; ``kill -9`` loses nothing acknowledged
(every acknowledged transaction is in a durable block, on this node or in etcd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from medledger.consortium import _nodeio
from medledger.consortium.catchup import CatchUp
from medledger.consortium.client import PeerClient, PeerUnavailable, RemoteCustodians, tls_context
from medledger.consortium.config import ConfigError, HttpEndpoint, NodeConfig, load_config
from medledger.consortium.gossip import CheckpointBook, ConsortiumMonitor, Gossip
from medledger.consortium.peer import PeerService, create_peer_app, health_json
from medledger.consortium.relay import PeerRelay
from medledger.crypto.keystore import Identity
from medledger.crypto.signing import SigningKey
from medledger.datadir import DataDir
from medledger.errors import MedledgerError, OrdererError, StorageError
from medledger.node import Node, Receipt
from medledger.services.submitter import Submitter

__all__ = ["HaltingSubmitter", "NodeProcess", "main", "run_node"]

log = logging.getLogger("medledger.consortium")


class HaltingSubmitter(Submitter):
    """The node's one submitter; refuses every ledger write while the node is halted.

    (The node refuses too, :meth:`Node.halt_writes`; this answers before signing.)
    """

    def __init__(self, node: Node, monitor: ConsortiumMonitor) -> None:
        super().__init__(node)
        self.monitor = monitor

    async def submit(self, key: SigningKey, type_: str, payload: dict[str, Any]) -> Receipt:
        if not self.monitor.writes_allowed:
            raise OrdererError(f"writes are halted on this node: {self.monitor.halted_reason}")
        return await super().submit(key, type_, payload)


def _lock_data_dir(dd: DataDir) -> int:
    """One process writes a ledger at a time (the same lock file as ``medledger serve``)."""
    dd.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(dd.path / "runtime.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MedledgerError(
            f"{dd.path} is in use by another medledger process (node start or serve)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the node process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app: Any, ep: HttpEndpoint, name: str) -> _Server:
    config = uvicorn.Config(
        app,
        host=ep.host,
        port=ep.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ssl_certfile=str(ep.tls_cert) if ep.tls_cert else None,
        ssl_keyfile=str(ep.tls_key) if ep.tls_key else None,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    return server


class NodeProcess:
    """Everything one organisation's node runs (see the module docstring)."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        fhir: bool = True,
        orderer_options: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.want_fhir = fhir and cfg.api.enabled
        self.orderer_options = dict(cfg.orderer_options) | dict(orderer_options or {})
        self.monitor = ConsortiumMonitor(cfg.org)
        self.dd = DataDir(cfg.data_dir)
        self.node: Node | None = None
        self.identity: Identity | None = None
        self.client: PeerClient | None = None
        self.submitter: HaltingSubmitter | None = None
        self.service: PeerService | None = None
        self.peer_app: FastAPI | None = None
        self.fhir_app: FastAPI | None = None
        self.fhir_error: str | None = None
        self.runtime: Any = None
        self.records_store: Any = None
        self.gossip: Gossip | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._servers: list[_Server] = []
        self._lock_fd: int | None = None
        self._open = False  # every API listens (see run)

    # -- opening -----------------------------------------------------------------------
    async def open(self) -> None:
        cfg = self.cfg
        self._lock_fd = _lock_data_dir(self.dd)
        self.identity = self.dd.identity(cfg.node_key_name)
        signers = [(cfg.org, self.identity.signing)]
        try:
            node = await Node.open(cfg.store, signers)
        except StorageError as exc:
            if "holds no ledger" not in str(exc):
                raise
            node = await Node.create(cfg.store, self.dd.genesis(), signers)
            log.info("created the ledger of %s from the genesis in %s", cfg.org, cfg.data_dir)
        if node.network != cfg.network:
            await node.close()
            raise MedledgerError(f"{cfg.store} holds network {node.network!r}, not {cfg.network!r}")
        self.node = node
        self.monitor.on_halt = node.halt_writes
        self.client = PeerClient(
            network=cfg.network,
            org=cfg.org,
            key=self.identity.signing,
            peers={p.org: p.url for p in cfg.peers},
            verify=tls_context(cfg.peer.tls_ca),
        )
        self.submitter = HaltingSubmitter(node, self.monitor)
        book = CheckpointBook(node, self.monitor)
        if self.want_fhir:
            await self._open_fhir()
        records = None if self.runtime is None else self.runtime.records
        store = None
        if records is None:
            from medledger.store.records import open_record_store

            store = self.records_store = await open_record_store(cfg.records)
        self.service = PeerService(
            node,
            org=cfg.org,
            key=self.identity.signing,
            monitor=self.monitor,
            book=book,
            submitter=self.submitter,
            records=records,
            store=store,
            encryption=self.identity.encryption,
            max_skew_ms=int(cfg.gossip.max_clock_skew * 1000),
            health=self.health,
        )
        self.peer_app = create_peer_app(self.service)
        self.gossip = Gossip(node, book, self.client, self.monitor, interval=cfg.gossip.interval)
        await book.verifiers()  # member count for the majority rule

    async def _open_fhir(self) -> None:
        """The FHIR API sharing this node and submitter (disabled, loudly, if it fails)."""
        assert self.node is not None and self.submitter is not None and self.client is not None
        try:
            from medledger.api.app import create_app
            from medledger.api.runtime import Runtime
            from medledger.api.settings import Settings
            from medledger.api.smart import SmartAuthority
            from medledger.services.access import AccessService
            from medledger.services.fhir import FhirService
            from medledger.services.records import OrgCrypto, RecordService
            from medledger.store.records import open_record_store

            cfg, node, sub = self.cfg, self.node, self.submitter
            settings = Settings.for_node(cfg)
            assert self.identity is not None
            access = AccessService(node, sub, dict(node.signers))
            orgs = {cfg.org: OrgCrypto.from_identity(cfg.org, self.identity)}
            store = self.records_store = await open_record_store(cfg.records)
            # records other organisations hold are read from their nodes (peer API)
            records = RecordService(
                node, sub, access, store, orgs, remote=RemoteCustodians(self.client)
            )
            fhir = FhirService(
                node=node,
                submitter=sub,
                access=access,
                records=records,
                store=store,
                orgs=orgs,
                keystore=self.dd.keystore,
                passphrase=self.dd.passphrase(),
                base_url=settings.fhir_base,
            )
            smart = await SmartAuthority.open(settings.smart_store, token_url=settings.token_url)
            self.runtime = Runtime(
                settings=settings,
                data_dir=self.dd,
                node=node,
                submitter=sub,
                access=access,
                store=store,
                records=records,
                fhir=fhir,
                orgs=orgs,
                smart=smart,
            )
            app = create_app(settings)
            runtime = self.runtime

            @asynccontextmanager
            async def lifespan(app: FastAPI) -> AsyncIterator[None]:
                app.state.runtime = runtime  # owned and closed by the node process
                yield

            app.router.lifespan_context = lifespan
            self._add_health(app)
            self.fhir_app = app
        except Exception as exc:
            self.fhir_error = f"{type(exc).__name__}: {exc}"
            log.exception("the FHIR API could not be set up; serving the peer API only")

    def _add_health(self, app: FastAPI) -> None:
        async def health() -> JSONResponse:
            return JSONResponse(
                self.health(), status_code=200 if self.monitor.writes_allowed else 503
            )

        app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
        # before the portal's catch-all mount at "/"
        route = app.router.routes.pop()
        app.router.routes.insert(0, route)

    def health(self) -> dict[str, Any]:
        assert self.node is not None
        doc = health_json(self.node, self.cfg.org, self.monitor)
        doc["fhir"] = self.fhir_error is None and self.fhir_app is not None
        if self.fhir_error:
            doc["fhir_error"] = self.fhir_error
        orderer = self.node.orderer
        failure = getattr(orderer, "failure", None) if orderer is not None else None
        doc["orderer"] = {
            "url": self.cfg.orderer,
            "running": orderer is not None and failure is None,
            "failure": None if failure is None else str(failure),
            "position": list(getattr(orderer, "position", ()) or ()) or None,
        }
        return doc

    # -- ordering and catch-up ---------------------------------------------------------
    async def start_ordering(self) -> None:
        """Start the orderer, catching up from peers whenever etcd cannot serve the history."""
        from medledger.orderer.etcd import CatchUpRequired, read_position

        assert self.node is not None
        node = self.node
        options = dict(self.orderer_options)
        # relaying (``relay = true``): one member's node proposes for all
        if options.pop("relay", False) and self.cfg.peers:
            assert self.client is not None
            options["relay"] = PeerRelay(self.client, self.monitor)
        delay = 0.2
        while True:
            try:
                await node.start(self.cfg.orderer, **options)
                self.monitor.phase = "serving" if self._open else "preparing"
                log.info("ordering through %s from height %d", self.cfg.orderer, node.head.height)
                return
            except ValueError as exc:  # make_orderer: the orderer URL or [orderer_options]
                raise ConfigError(f"orderer {self.cfg.orderer}: {exc}") from None
            except CatchUpRequired as exc:
                log.warning("%s", exc)
                await self.catch_up()
                delay = 0.2
            except OrdererError as exc:
                position = await node.storage(read_position)
                if position is None and node.head.height > 0:
                    log.warning("no ordering position for height %d: catching up", node.head.height)
                    await self.catch_up()
                    continue
                log.warning("ordering service unavailable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def catch_up(self) -> None:
        """Fetch and verify peers' blocks until this node reaches their height."""
        assert self.node is not None and self.client is not None
        self.monitor.phase = "catching-up"
        delay = 0.5
        while True:
            try:
                summary = await CatchUp(self.node, self.client).run()
                log.info(
                    "catch-up: height %d -> %d from %s",
                    summary["from"],
                    summary["to"],
                    ", ".join(summary["sources"]) or "nobody (already there)",
                )
                return
            except (PeerUnavailable, MedledgerError) as exc:
                log.warning("catch-up incomplete (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _supervise(self) -> None:
        """Restart ordering (after catch-up) when the orderer stops deriving blocks."""
        from medledger.orderer.etcd import CatchUpRequired

        assert self.node is not None
        while True:
            await asyncio.sleep(0.5)
            orderer = self.node.orderer
            failure = getattr(orderer, "failure", None) if orderer is not None else None
            if failure is None:
                continue
            log.error("orderer stopped: %s", failure)
            await _nodeio.stop_orderer(self.node)
            if isinstance(failure, CatchUpRequired):
                await self.catch_up()
            self.monitor.phase = "starting"
            await self.start_ordering()

    # -- serving -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set.

        The peer API serves first (peers and catch-up need it); the node reports the phase
        ``serving`` only once ordering runs, the record store is settled and the FHIR API
        is listening, so whoever waits for that phase can use every API at once.
        """
        assert self.peer_app is not None and self.gossip is not None
        await self._serve(_uvicorn(self.peer_app, self.cfg.peer, "peer"), "peer")
        log.info("peer API of %s on %s", self.cfg.org, self.cfg.peer.url)
        ordering = asyncio.create_task(self.start_ordering())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({ordering, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            ordering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ordering
            return
        await ordering
        self.gossip.start()
        self._tasks.append(asyncio.create_task(self._supervise(), name="medledger-supervisor"))
        if self.fhir_app is not None:
            await self._prepare_records()
        if self.fhir_app is not None:
            await self._serve(_uvicorn(self.fhir_app, self.cfg.api, "api"), "FHIR")
            log.info("FHIR API of %s on %s/fhir", self.cfg.org, self.cfg.api.url)
        self._open = True
        if self.monitor.phase == "preparing":  # (not when the orderer failed meanwhile)
            self.monitor.phase = "serving"
        print(
            json.dumps({"org": self.cfg.org, "ready": True, "peer": self.cfg.peer.url}),
            flush=True,
        )
        await waiter

    async def _serve(self, server: _Server, name: str) -> None:
        """Start ``server`` and return once it listens; its bind error if it cannot."""
        self._servers.append(server)
        task = asyncio.create_task(server.serve(), name=f"medledger-{name.lower()}-api")
        self._tasks.append(task)
        while not server.started:
            if task.done():
                await task  # raises the bind error
                raise MedledgerError(
                    f"the {name} API did not start on {server.config.host}:{server.config.port}"
                )
            await asyncio.sleep(0.02)

    async def _prepare_records(self) -> None:
        """Settle the record store before the FHIR API serves, as an embedded runtime does.

        Runs once ordering has applied everything etcd holds, so a version an earlier
        process staged is judged against the whole ledger: promoted when its commitment
        is on it (the process died between commit and promotion), dropped when it can
        never commit. Then the search index is brought to this version's index format
        (:meth:`FhirService.upgrade_index`). A failure disables the FHIR API, loudly,
        like a failed set-up.
        """
        try:
            promoted, dropped = await self.runtime.records.recover()
            if promoted or dropped:
                log.warning(
                    "record store: %d staged versions promoted, %d dropped", promoted, dropped
                )
            await self.runtime.fhir.upgrade_index()
        except Exception as exc:
            self.fhir_error = f"{type(exc).__name__}: {exc}"
            self.fhir_app = None
            log.exception("the record store could not be prepared; serving the peer API only")

    async def close(self) -> None:
        self.monitor.phase = "stopping"
        log.info("stopping")
        if self.gossip is not None:
            await self.gossip.stop()
        if self.client is not None:
            await self.client.close()
        for server in self._servers:
            server.should_exit = True
        for task in self._tasks:
            if task.get_name() == "medledger-supervisor":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._tasks.clear()
        log.info("servers stopped")
        if self.runtime is not None and self.runtime.smart is not None:
            with contextlib.suppress(Exception):
                await self.runtime.smart.close()
        if self.records_store is not None:
            with contextlib.suppress(Exception):
                await self.records_store.close()
        if self.node is not None:
            await self.node.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")


async def run_node(cfg: NodeConfig) -> int:
    """Run the node until SIGTERM/SIGINT; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proc = NodeProcess(cfg)
    try:
        await proc.open()
        # A long-running server: everything loaded so far (models, apps, the
        # genesis state) stays for the life of the process, so take it out of
        # the cyclic collector's sight, and collect less often. With the default
        # settings a node under load paid 0.4-0.7 s per half minute in collections
        # and stalled 55-160 ms in each full one (every ~10 s); nothing here relies
        # on prompt cycle collection (memory is freed by reference counting).
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        await proc.run(stop)
    finally:
        await proc.close()
    return 0


def setup_logging(org: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {org} %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """``python -m medledger.consortium.process --config node.toml``."""
    parser = argparse.ArgumentParser(prog="medledger node start")
    parser.add_argument("--config", required=True, help="the node.toml of this node")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except MedledgerError as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.org)
    try:
        return asyncio.run(run_node(cfg))
    except MedledgerError as exc:
        log.error("%s: %s", exc.code, exc)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
