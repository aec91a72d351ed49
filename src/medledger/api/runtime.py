"""The running services of one data directory: node, record store, SMART authority, FHIR.

One :class:`Runtime` is opened per process (by the API's lifespan, or by a CLI
command such as ``medledger import``) and closed once. In an embedded network
the node holds every organisation's node key, so one runtime serves every
organisation; the same objects and code paths serve a single-organisation node.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from medledger.api.settings import Settings
from medledger.api.smart import SmartAuthority
from medledger.contracts.base import scan_objs
from medledger.datadir import DataDir, DataDirError
from medledger.errors import MedledgerError
from medledger.node import Node
from medledger.services.access import AccessService
from medledger.services.fhir import FhirService
from medledger.services.records import OrgCrypto, RecordService
from medledger.services.submitter import Submitter
from medledger.state.base import StateReader
from medledger.store.records import RecordStore, open_record_store

__all__ = ["Runtime", "RuntimeError_"]


class RuntimeError_(MedledgerError):
    """A service the request needs is not part of this runtime."""

    code = "runtime"


@dataclass(slots=True)
class Runtime:
    settings: Settings
    data_dir: DataDir
    node: Node
    submitter: Submitter
    access: AccessService
    store: RecordStore
    records: RecordService
    fhir: FhirService
    orgs: dict[str, OrgCrypto]
    smart: SmartAuthority | None = None
    demo_identities: list[dict[str, Any]] = field(default_factory=list)
    demo_token_ttl: int = 900
    lock: int = -1  # fd holding the data directory's process lock
    own_node: bool = True  # opened (and so closed) by this runtime

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        smart: bool = True,
        clock: Callable[[], float] = time.time,
        max_wait: float = 0.0,
        node: Node | None = None,
        submitter: Submitter | None = None,
        records_remote: Any = None,
        upgrade_index: bool = True,
    ) -> Runtime:
        """Open and start everything the data directory describes.

        ``max_wait`` is the embedded orderer's batching delay: 0 (the default)
        commits a lone transaction at once, which keeps a read's ``access.log``
        latency low; an import passes a few milliseconds for bigger blocks.

        A process that already runs the node (the consortium node process, which
        orders through etcd and serves peers too) passes its started ``node`` and
        its ``submitter`` (one per node key, so sequence numbers never collide)
        and ``records_remote`` (cross-node custodians for the record service);
        the runtime then neither starts, locks nor closes that node.

        A record store indexed by another index version is reindexed before this
        returns, unless ``upgrade_index`` is off (``medledger reindex``, which
        reindexes itself, with progress).
        """
        dd = DataDir(settings.data_dir)
        dd.config()  # a clear error when the directory is not initialised
        identities = dd.org_keys()
        own_node = node is None
        lock = _lock_data_dir(dd) if own_node else -1
        try:
            if node is None:
                node = await Node.open(
                    dd.config()["store"],
                    [(org, ident.signing) for org, ident in identities.items()],
                )
        except BaseException:
            if lock >= 0:
                os.close(lock)
            raise
        store: RecordStore | None = None
        authority: SmartAuthority | None = None
        try:
            if own_node:
                await node.start(max_wait=max_wait)
            submitter = submitter or Submitter(node)
            access = AccessService(node, submitter, dict(node.signers))
            orgs = {org: OrgCrypto.from_identity(org, ident) for org, ident in identities.items()}
            store = await open_record_store(settings.records_store)
            extra: dict[str, Any] = {} if records_remote is None else {"remote": records_remote}
            records = RecordService(node, submitter, access, store, orgs, **extra)
            await records.recover()  # finish or drop writes an earlier process left staged
            fhir = FhirService(
                node=node,
                submitter=submitter,
                access=access,
                records=records,
                store=store,
                orgs=orgs,
                keystore=dd.keystore,
                passphrase=dd.passphrase(),
                base_url=settings.fhir_base,
            )
            if upgrade_index:  # after an upgrade that indexes records differently
                await fhir.upgrade_index()
            if smart:
                authority = await SmartAuthority.open(
                    settings.smart_store, token_url=settings.token_url, clock=clock
                )
            runtime = cls(
                settings=settings,
                data_dir=dd,
                node=node,
                submitter=submitter,
                access=access,
                store=store,
                records=records,
                fhir=fhir,
                orgs=orgs,
                smart=authority,
                lock=lock,
                own_node=own_node,
            )
            if settings.demo and authority is not None:
                runtime.demo_identities = await runtime._demo_identities()
            return runtime
        except BaseException:
            if authority is not None:
                await authority.close()
            if store is not None:
                await store.close()
            if own_node:
                await node.close()
            if lock >= 0:
                os.close(lock)
            raise

    def require_smart(self) -> SmartAuthority:
        if self.smart is None:
            raise RuntimeError_("this runtime was opened without the SMART authority")
        return self.smart

    async def close(self) -> None:
        try:
            if self.smart is not None:
                await self.smart.close()
            await self.store.close()
        finally:
            try:
                if self.own_node:
                    await self.node.close()
            finally:
                if self.lock >= 0:
                    os.close(self.lock)
                    self.lock = -1

    # -- demo identities -------------------------------------------------------------
    async def _demo_identities(self) -> list[dict[str, Any]]:
        """A SMART client for every practitioner, patient and organisation (demo sign-in).

        The clients are registered once (remembered in ``DIR/demo-clients.json``) with
        a public key whose private half is discarded at once: they can never obtain a
        token through ``/auth/token``, only through the demo picker, which exists only
        when the server runs with ``--demo``.
        """
        smart = self.require_smart()
        path = self.data_dir.path / "demo-clients.json"
        known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

        def _scan(state: StateReader) -> tuple[list[Any], list[Any]]:
            principals = [v for _, v in scan_objs(state, b"principal/")]
            orgs = [v for _, v in scan_objs(state, b"org/")]
            return principals, orgs

        principals, orgs = await self.node.read(_scan)
        names = {o.get("id"): o.get("name") for o in orgs if isinstance(o, dict)}
        served = set(self.orgs)
        wanted: list[dict[str, Any]] = []
        for org in sorted(served):
            wanted.append(
                {
                    "id": f"system:{org}",
                    "label": f"{names.get(org, org)} (system)",
                    "kind": "system",
                    "org": org,
                    "roles": [],
                    "scope": "system/*.cruds",
                }
            )
        for p in principals:
            if not isinstance(p, dict) or p.get("status") != "active":
                continue
            kind, pid = p.get("kind"), p.get("id")
            if kind in ("practitioner", "app") and p.get("org") in served:
                wanted.append(
                    {
                        "id": pid,
                        "label": f"{pid} ({', '.join(p.get('roles') or [])})",
                        "kind": "practitioner",
                        "org": p["org"],
                        "roles": list(p.get("roles") or []),
                        "practitioner": pid,
                        "scope": "user/*.cruds",
                    }
                )
            elif kind == "patient" and pid in self.data_dir.keystore.names():
                home = await self._patient_org(str(pid))
                if home is not None:
                    wanted.append(
                        {
                            "id": pid,
                            "label": f"patient {pid[:12]}…",
                            "kind": "patient",
                            "org": home,
                            "roles": [],
                            "patient": pid,
                            "scope": "patient/*.cruds",
                        }
                    )
        labels_file = self.data_dir.path / "demo-labels.json"  # written by `medledger demo`
        labels: dict[str, str] = json.loads(labels_file.read_text()) if labels_file.exists() else {}
        out: list[dict[str, Any]] = []
        for ident in wanted:
            ident["label"] = labels.get(ident["id"], ident["label"])
            client_id = known.get(ident["id"])
            if client_id is None or await smart.get_client(client_id) is None:
                client = await smart.register_client(
                    org=ident["org"],
                    practitioner=ident.get("practitioner"),
                    patient=ident.get("patient"),
                    jwks=_throwaway_jwks(),
                    scope=ident["scope"],
                )
                client_id = known[ident["id"]] = client.client_id
            ident["client_id"] = client_id
            ident["org_name"] = names.get(ident["org"], ident["org"])
            out.append(ident)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return out

    async def _patient_org(self, patient: str) -> str | None:
        raw = await self.node.state_get(f"patient/{patient}".encode())
        if raw is None:
            return None
        from medledger.encoding import decode

        orgs = decode(raw).get("orgs") or []
        return str(orgs[0]) if orgs else None


def _lock_data_dir(dd: DataDir) -> int:
    """An exclusive lock on the data directory: one process writes its ledger at a time.

    Two processes ordering blocks on the same ledger file would both believe
    they hold the head; ``medledger import`` and ``medledger serve`` on one
    directory must therefore not run at once (import through the API instead).
    """
    path = dd.path / "runtime.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DataDirError(
            f"{dd.path} is in use by another medledger process (serve or import); "
            "stop it first, or import through the running API"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _throwaway_jwks() -> dict[str, Any]:
    """A JWKS holding a fresh P-384 public key whose private key is never kept."""
    import jwt

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    jwk.update({"kid": "demo-" + secrets.token_hex(4), "alg": "ES384", "use": "sig"})
    return {"keys": [jwk]}
