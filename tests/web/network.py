"""A small embedded network with real data, served by the real app, for the browser tests.

Three organisations (a hospital, a clinic and a laboratory); a physician, an
emergency clinician and a privacy officer at the clinic, a physician at the
hospital; one Synthea patient
whose encounters are held by the hospital and whose lab results are held by the
laboratory, imported through the FHIR API itself with each organisation's
system client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from medledger.api.app import create_app
from medledger.api.settings import Settings
from medledger.cli_admin import session
from medledger.datadir import DataDir

from .conftest import ServerThread, free_port

DATA = Path(__file__).parent / "data"
ORGS = [
    ("hospital", "St Mary's Hospital"),
    ("clinic", "Riverside Clinic"),
    ("lab", "Northside Laboratory"),
]
PRACTITIONERS = [
    ("dr-grey", "clinic", ["physician"]),
    ("dr-ross", "clinic", ["emergency-clinician", "physician"]),
    ("po-clinic", "clinic", ["privacy-officer"]),
    ("dr-hale", "hospital", ["physician"]),
]
FHIR_JSON = "application/fhir+json"


@dataclass
class Network:
    data_dir: Path
    patient: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextmanager
    def serve(self) -> Iterator[ServerThread]:
        settings = Settings(data_dir=self.data_dir, base_url=self.url, demo=True)
        with ServerThread(create_app(settings), port=self.port) as server:
            yield server


def demo_token(base: str, identity: str) -> str:
    r = httpx.post(f"{base}/api/demo/login", json={"identity": identity}, timeout=30)
    r.raise_for_status()
    token: str = r.json()["access_token"]
    return token


def _post_bundle(base: str, token: str, bundle: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(
        f"{base}/fhir",
        content=json.dumps(bundle),
        headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def build_network(root: Path) -> Network:
    dd = DataDir(root / "node")
    node = await dd.init_embedded(network="medledger-portal", orgs=ORGS)
    await node.close()
    async with session(dd.path) as s:
        for pid, org, roles in PRACTITIONERS:
            ident = s.dd.keystore.create(pid, s.dd.passphrase())
            await s.submitter.submit(
                s.admin(org).signing,
                "principal.register",
                {
                    "id": pid,
                    "kind": "practitioner",
                    "roles": roles,
                    "pub": ident.signing.public.raw,
                },
            )
    net = Network(dd.path, "", free_port())
    data = json.loads((DATA / "carmona.json").read_text())
    with net.serve() as server:
        hospital = _post_bundle(
            server.url, demo_token(server.url, "system:hospital"), data["hospital"]
        )
        locations = [e["response"]["location"] for e in hospital["entry"]]
        patient = next(loc.split("/")[1] for loc in locations if loc.startswith("Patient/"))
        lab = json.loads(json.dumps(data["lab"]).replace("{patient}", patient))
        _post_bundle(server.url, demo_token(server.url, "system:lab"), lab)
    net.patient = patient
    return net
