"""A tiny in-test ledger: genesis, signed transactions, check_signer, handlers, effects."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import pytest

from medledger.contracts import core, make_registry
from medledger.contracts.base import Effects, Env, get_obj
from medledger.crypto.signing import SigningKey
from medledger.errors import MedledgerError
from medledger.ledger.tx import make_tx
from medledger.state.base import MemoryState
from medledger.state.overlay import Overlay

GENESIS_TIME = 1_700_000_000_000
NETWORK = "medledger-test"

_patient_counter = itertools.count(1)


def new_patient_id() -> str:
    return "pat-" + hashlib.sha256(str(next(_patient_counter)).encode()).hexdigest()[:32]


def commitment(text: str) -> bytes:
    return hashlib.sha256(b"salt" + text.encode()).digest()


class Ledger:
    """Applies transactions the way the ledger does, minus blocks and the log."""

    def __init__(
        self,
        orgs: tuple[str, ...] = ("h1", "h2", "h3"),
        *,
        policy: Mapping[str, Any] | None = None,
        contracts: Mapping[str, list[list[int]]] | None = None,
        modules: Mapping[str, Mapping[int, ModuleType]] | None = None,
    ) -> None:
        self.keys: dict[str, SigningKey] = {}
        doc_orgs, admins = [], []
        for org in orgs:
            node = self.keys[f"node:{org}"] = SigningKey.generate()
            adm = self.keys[f"admin-{org}"] = SigningKey.generate()
            doc_orgs.append(
                {"id": org, "name": org.upper(), "node_key": node.public.raw, "enc_key": b"k" * 32}
            )
            admins.append({"id": f"admin-{org}", "org": org, "key": adm.public.raw})
        genesis = core.normalise_genesis(
            {
                "network": NETWORK,
                "time": GENESIS_TIME,
                "orgs": doc_orgs,
                "admins": admins,
                "policy": dict(policy or {}),
                "contracts": dict(contracts or {}),
            }
        )
        self.state = MemoryState()
        self.state.apply(core.genesis_effects(genesis).writes)
        self.config = get_obj(self.state, b"cfg/network")
        self.registry = make_registry(self.config, modules)
        self.height = 0
        self.time = GENESIS_TIME
        self.seqs: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []

    # -- applying -------------------------------------------------------------------
    def submit(
        self, who: str, type_: str, payload: dict[str, Any], *, advance: int = 1000
    ) -> Effects:
        """Sign, check and apply one transaction in its own block; raise on rejection."""
        key = self.keys[who]
        seq = self.seqs.get(who, 0) + 1
        time = self.time + advance
        tx = make_tx(key, NETWORK, type_, payload, seq=seq, time=time)
        height = self.height + 1
        principal = core.check_signer(self.state, tx, height)
        handler = self.registry.handler(tx.type, height)
        env = Env(
            network=NETWORK,
            height=height,
            time=time,
            tx_id=tx.tx_id,
            signer=tx.signer,
            principal=principal,
            config=self.config,
        )
        fx = handler(self.state, tx, env)
        overlay = Overlay(self.state)
        for k, v in fx.writes.items():
            if v is None:
                overlay.delete(k)
            else:
                overlay.put(k, v)
        self.state.apply(overlay.changes())
        self.height, self.time, self.seqs[who] = height, time, seq
        self.last_tx_id = tx.tx_id
        self.events.extend(fx.events)
        return fx

    def reject(
        self, exc: type[MedledgerError], who: str, type_: str, payload: dict[str, Any]
    ) -> MedledgerError:
        """Assert the transaction is rejected with ``exc`` and changes nothing."""
        before = dict(self.state.items())
        with pytest.raises(exc) as info:
            self.submit(who, type_, payload)
        assert dict(self.state.items()) == before
        return info.value

    def get(self, key: str) -> Any:
        return get_obj(self.state, key.encode())

    # -- conveniences ----------------------------------------------------------------
    def practitioner(self, org: str, pid: str, roles: list[str], kind: str = "practitioner") -> str:
        key = self.keys[pid] = SigningKey.generate()
        self.submit(
            f"admin-{org}",
            "principal.register",
            {"id": pid, "kind": kind, "roles": roles, "pub": key.public.raw},
        )
        return pid

    def patient(self, custodian: str = "h1", *, claimed: bool = True) -> str:
        pid = new_patient_id()
        payload: dict[str, Any] = {
            "id": pid,
            "links": [{"org": custodian, "commitment": commitment(pid + custodian)}],
        }
        if claimed:
            key = self.keys[pid] = SigningKey.generate()
            payload["pub"] = key.public.raw
        else:
            payload["claim"] = hashlib.sha256(b"claim-code-" + pid.encode()).digest()
        self.submit(f"node:{custodian}", "patient.register", payload)
        return pid

    def consent(self, who: str, consent: dict[str, Any]) -> Effects:
        return self.submit(who, "consent.grant", {"consent": consent})

    def record(
        self,
        org: str,
        patient: str,
        rid: str,
        rtype: str,
        *,
        version: int = 1,
        prev: bytes | None = None,
        **extra: Any,
    ) -> bytes:
        c = commitment(f"{rid}/{version}")
        self.submit(
            f"node:{org}",
            "record.register",
            {
                "record": rid,
                "patient": patient,
                "resource_type": rtype,
                "commitment": c,
                "version": version,
                "prev": prev,
                **extra,
            },
        )
        return c


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()
