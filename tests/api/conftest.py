"""A live FHIR API over an embedded network of three organisations, with real SMART clients.

The session builds one data directory (hospital, clinic, lab; practitioners with
roles) with the real ``DataDir.init_embedded``, starts the real app with uvicorn
on a free loopback port in a background thread, and talks to it over HTTP with
bearer tokens obtained at ``/auth/token`` from private-key JWT assertions
(ES384) of registered clients. ``LiveServer.call`` runs a coroutine on the
server's event loop to look at the ledger directly (audit counts, head).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from medledger.api.app import create_app
from medledger.api.runtime import Runtime
from medledger.api.settings import Settings
from medledger.datadir import DataDir
from medledger.services.submitter import Submitter

T = TypeVar("T")

DATA = Path(__file__).parent / "data"
NDJSON_DIR = DATA / "synthea-ndjson"
BUNDLE_FILE = DATA / "synthea-bundles" / "Antonio_Carmona_7322ed57-a337-4b4d-adcc-cc30db95203c.json"
NETWORK = "api-test"
ORGS = [("hospital", "City Hospital"), ("clinic", "Family Clinic"), ("lab", "Central Lab")]
#: practitioner id -> (org, roles)
PRACTITIONERS: dict[str, tuple[str, list[str]]] = {
    "dr-house": ("hospital", ["physician"]),
    "dr-er": ("hospital", ["emergency-clinician"]),
    "po-hospital": ("hospital", ["privacy-officer"]),
    "nurse-clinic": ("clinic", ["nurse"]),
    "dr-clinic": ("clinic", ["physician"]),
    "tech-lab": ("lab", ["lab"]),
}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"


def records_digest(data_dir: Path) -> str:
    """A digest of every row of the data directory's record store (SQLite), read only."""
    db = sqlite3.connect(f"file:{data_dir / 'records.db'}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in sorted(tables):
            for row in sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr):
                digest.update(repr(row).encode())
        return digest.hexdigest()
    finally:
        db.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_network(path: Path, *, practitioners: bool = True) -> None:
    """An embedded opt-in network (hospital, clinic, lab) with registered practitioners."""

    async def go() -> None:
        dd = DataDir(path)
        node = await dd.init_embedded(
            network=NETWORK,
            orgs=ORGS,
            policy={"consent_default": "opt-in", "break_glass_minutes": 60},
        )
        try:
            await node.start()
            sub = Submitter(node)
            if practitioners:
                for pid, (org, roles) in PRACTITIONERS.items():
                    ident = dd.keystore.create(pid)
                    await sub.submit(
                        dd.identity(f"admin-{org}").signing,
                        "principal.register",
                        {
                            "id": pid,
                            "kind": "practitioner",
                            "roles": roles,
                            "pub": ident.signing.public.raw,
                        },
                    )
        finally:
            await node.close()

    asyncio.run(go())


class LiveServer:
    """The real app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, data_dir: Path, *, port: int | None = None, demo: bool = False) -> None:
        self.port = port or free_port()
        self.settings = Settings.for_listen(data_dir, host="127.0.0.1", port=self.port, demo=demo)
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            loop="asyncio",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def fhir(self) -> str:
        return self.settings.fhir_base

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the server's event loop and wait for its result."""
        loop: asyncio.AbstractEventLoop = self.app.state.loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@dataclass
class SmartClient:
    """A registered Backend Services client holding its own ES384 private key."""

    client_id: str
    key: ec.EllipticCurvePrivateKey
    kid: str
    token_url: str
    scope: str

    def assertion(
        self,
        *,
        aud: str | None = None,
        exp_in: int = 240,
        jti: str | None = None,
        kid: str | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        iss: str | None = None,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": iss or self.client_id,
            "sub": iss or self.client_id,
            "aud": aud or self.token_url,
            "exp": now + exp_in,
            "jti": jti or str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, key or self.key, algorithm="ES384", headers={"kid": kid or self.kid}
        )

    def form(self, scope: str | None = None, **assertion: Any) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(**assertion),
            "scope": scope or self.scope,
        }


def new_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    kid = "k-" + uuid.uuid4().hex[:8]
    jwk.update({"kid": kid, "alg": "ES384", "use": "sig"})
    return key, jwk


@dataclass
class Api:
    """HTTP access to the live server as different callers."""

    server: LiveServer
    http: httpx.Client
    _clients: dict[tuple[str, str], SmartClient] = field(default_factory=dict)
    _tokens: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    # -- clients and tokens -----------------------------------------------------------
    def client(self, who: str, scope: str) -> SmartClient:
        """A client for ``who`` ("system:ORG", "practitioner:ID" or "patient:ID")."""
        cached = self._clients.get((who, scope))
        if cached is not None:
            return cached
        kind, _, ident = who.partition(":")
        key, jwk = new_key()
        org = ident if kind == "system" else None
        if kind == "practitioner":
            org = PRACTITIONERS[ident][0]
        if kind == "patient":
            org = self.patient_org(ident)
        assert org is not None
        smart = self.server.runtime.require_smart()
        registered = self.server.call(
            smart.register_client(
                org=org,
                practitioner=ident if kind == "practitioner" else None,
                patient=ident if kind == "patient" else None,
                jwks={"keys": [jwk]},
                scope=scope,
            )
        )
        client = SmartClient(
            registered.client_id, key, jwk["kid"], self.server.settings.token_url, scope
        )
        self._clients[(who, scope)] = client
        return client

    def token(self, who: str, scope: str = "system/*.cruds") -> str:
        """A bearer token for ``who`` from /auth/token (a fresh assertion each time)."""
        if (
            ":" in who
            and who.split(":")[0] in ("practitioner", "patient")
            and scope.startswith("system/")
        ):
            scope = ("user/" if who.startswith("practitioner") else "patient/") + scope[7:]
        cached = self._tokens.get((who, scope))
        if cached is not None and cached[1] > time.time() + 30:
            return cached[0]
        client = self.client(who, scope)
        r = self.http.post("/auth/token", data=client.form())
        assert r.status_code == 200, r.text
        doc = r.json()
        self._tokens[(who, scope)] = (doc["access_token"], time.time() + doc["expires_in"])
        return str(doc["access_token"])

    def headers(self, who: str, scope: str = "system/*.cruds", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(who, scope)}", **extra}

    # -- requests ---------------------------------------------------------------------------
    def get(self, path: str, who: str, scope: str = "system/*.cruds", **kw: Any) -> httpx.Response:
        headers = {**self.headers(who, scope), **kw.pop("headers", {})}
        return self.http.get(f"/fhir/{path}", headers=headers, **kw)

    def post(
        self, path: str, body: Any, who: str, scope: str = "system/*.cruds", **kw: Any
    ) -> httpx.Response:
        headers = {
            **self.headers(who, scope),
            "Content-Type": FHIR_JSON,
            **kw.pop("headers", {}),
        }
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post(f"/fhir/{path}".rstrip("/"), content=content, headers=headers, **kw)

    def put(
        self, path: str, body: Any, who: str, scope: str = "system/*.cruds", **kw: Any
    ) -> httpx.Response:
        headers = {
            **self.headers(who, scope),
            "Content-Type": FHIR_JSON,
            **kw.pop("headers", {}),
        }
        return self.http.put(f"/fhir/{path}", content=json.dumps(body), headers=headers, **kw)

    def delete(
        self, path: str, who: str, scope: str = "system/*.cruds", **kw: Any
    ) -> httpx.Response:
        headers = {**self.headers(who, scope), **kw.pop("headers", {})}
        return self.http.delete(f"/fhir/{path}", headers=headers, **kw)

    # -- ledger views --------------------------------------------------------------------
    def patient_org(self, patient: str) -> str:
        async def get() -> str:
            raw = await self.server.runtime.node.state_get(f"patient/{patient}".encode())
            assert raw is not None, f"patient {patient} is not registered"
            from medledger.encoding import decode

            return str(decode(raw)["orgs"][0])

        return self.server.call(get())

    def audit(self, patient: str) -> list[dict[str, Any]]:
        return self.server.call(self.server.runtime.access.audit_feed(patient))

    def head(self) -> tuple[int, int]:
        async def get() -> tuple[int, int]:
            head = self.server.runtime.node.head
            return head.height, head.log_size

        return self.server.call(get())

    # -- fixtures of data -------------------------------------------------------------------
    def new_patient(self, org: str = "hospital", resource: dict[str, Any] | None = None) -> str:
        body = copy.deepcopy(resource or synthea_patient())
        r = self.post("Patient", body, f"system:{org}")
        assert r.status_code == 201, r.text
        pid: str = r.json()["id"]
        return pid

    def observation(
        self,
        patient: str,
        org: str = "lab",
        *,
        code: str = "4548-4",
        display: str = "Hemoglobin A1c/Hemoglobin.total in Blood",
        when: str = "2021-02-03T10:00:00Z",
        value: float = 5.9,
    ) -> dict[str, Any]:
        body = lab_observation(patient, code=code, display=display, when=when, value=value)
        r = self.post("Observation", body, f"system:{org}")
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def consent(self, patient: str, *, to_org: str, types: list[str] | None = None) -> str:
        r = self.post(
            "Consent",
            consent_resource(patient, to_org, types),
            f"patient:{patient}",
            "patient/*.cruds",
        )
        assert r.status_code == 201, r.text
        cid: str = r.json()["id"]
        return cid


# -- resources -------------------------------------------------------------------------------


def synthea_patients() -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (NDJSON_DIR / "Patient.000.ndjson").read_text().splitlines()
    ]


def synthea_patient(i: int = 0) -> dict[str, Any]:
    return synthea_patients()[i]


def lab_observation(
    patient: str,
    *,
    code: str = "4548-4",
    display: str = "Hemoglobin A1c/Hemoglobin.total in Blood",
    when: str = "2021-02-03T10:00:00Z",
    value: float = 5.9,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "%",
            "system": "http://unitsofmeasure.org",
            "code": "%",
        },
    }


def consent_resource(
    patient: str, to_org: str, types: list[str] | None = None, *, purpose: str = "TREAT"
) -> dict[str, Any]:
    provision: dict[str, Any] = {
        "type": "permit",
        "actor": [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                        }
                    ]
                },
                "reference": {"reference": f"Organization/{to_org}"},
            }
        ],
        "purpose": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}
        ],
    }
    if types:
        provision["class"] = [
            {"system": "http://hl7.org/fhir/resource-types", "code": t} for t in types
        ]
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": provision,
    }


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def network_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-net") / "node"
    build_network(path)
    return path


@pytest.fixture(scope="session")
def live(network_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(network_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def api(live: LiveServer) -> Iterator[Api]:
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        yield Api(live, http)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., tuple[LiveServer, Api]]]:
    """A separate network and server for tests that tamper with files or restart."""
    started: list[tuple[LiveServer, httpx.Client]] = []

    def make(*, practitioners: bool = True, demo: bool = False) -> tuple[LiveServer, Api]:
        path = tmp_path / f"node-{len(started)}"
        build_network(path, practitioners=practitioners)
        server = LiveServer(path, demo=demo).start()
        http = httpx.Client(base_url=server.base_url, timeout=60)
        started.append((server, http))
        return server, Api(server, http)

    yield make
    for server, http in started:
        http.close()
        server.stop()
