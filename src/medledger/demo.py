"""``medledger demo``: the whole system in one command, narrated and checked step by step.

The demo builds an embedded network of three organisations (St Mary's Hospital,
Riverside Clinic and Northside Laboratory) in a fresh data directory, imports
three synthetic Synthea patients into them, and then plays a scenario around
one patient, Tom Goodwin, whose family doctor is at the clinic and whose lab
results are held by the laboratory:

1. a hospital physician is denied his lab results (no consent yet);
2. Tom signs a FHIR Consent for the hospital, and the physician reads the
   laboratory's record across organisations, with a notice of what is withheld;
3. a read outside the consent is denied;
4. before ordering an HbA1c test, the physician's duplicate check finds the one
   the laboratory did two weeks ago;
5. Tom revokes his consent, and the physician is denied again;
6. in an emergency a hospital emergency clinician breaks the glass, reads the
   results, and the hospital's privacy officer reviews the access;
7. Tom sees every access in his audit trail and proves the break-glass entry:
   its inclusion proof checked against a checkpoint signed by the network;
8. ``verify`` passes on the ledger, and catches an attempt to erase the
   break-glass flag from a copy of it.

Imports, reads, searches, consent and audit go through the real FHIR API
(:func:`medledger.api.app.create_app`, in-process over ``httpx.ASGITransport``)
with real SMART Backend Services tokens: each organisation, practitioner and
patient client signs a private-key JWT assertion and exchanges it at
``/auth/token``. What the API does not offer (registering practitioners, the
break-glass declaration and its review) is submitted as transactions signed
with the administrators' and practitioners' own keys. Each step checks what it
shows (status codes, decrypted content, the access log on the ledger, proofs)
and the summary says which steps passed. Afterwards the portal is served with
the demo identities (``medledger serve --demo`` on the same data) until
interrupted.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medledger.client import Client, Trust
from medledger.crypto.client_key import ClientKey
from medledger.crypto.signing import VerifyKey
from medledger.datadir import DataDir
from medledger.encoding import decode, encode
from medledger.ledger.checkpoint import Checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import VerifyReport, verify_ledger
from medledger.node import checkpoint_origin, signer_name
from medledger.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_PORT",
    "ORGS",
    "PRACTITIONERS",
    "STEP_NAMES",
    "DemoError",
    "main",
    "run_demo",
    "serve_portal",
]

NETWORK = "medledger-demo"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: (id, name) of the three organisations.
ORGS: tuple[tuple[str, str], ...] = (
    ("hospital", "St Mary's Hospital"),
    ("clinic", "Riverside Clinic"),
    ("lab", "Northside Laboratory"),
)
ORG_NAMES = dict(ORGS)
#: (id, organisation, roles) of the demo practitioners.
PRACTITIONERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("dr-grey", "hospital", ("physician",)),
    ("dr-ross", "hospital", ("emergency-clinician",)),
    ("po-hospital", "hospital", ("privacy-officer",)),
    ("dr-patel", "clinic", ("physician",)),
    ("nurse-kim", "clinic", ("nurse",)),
    ("tech-lab", "lab", ("lab",)),
)
#: Synthea bundles in ``demo_data/`` and the organisation that is each patient's home
#: (Patient, encounters, conditions, vital signs ...); lab results go to the laboratory.
#: The first one is the scenario's patient.
PATIENTS: tuple[tuple[str, str], ...] = (
    ("Tom_Goodwin_e20de9eb-6f2d-4871-a43f-bbede53293ed.json", "clinic"),
    ("Jordan_Cruickshank_5de38439-d320-46d3-854d-3c098e88de4c.json", "hospital"),
    ("Antonio_Carmona_7322ed57-a337-4b4d-adcc-cc30db95203c.json", "hospital"),
)
LAB_ORG = "lab"
#: The scenario's consent: what Tom lets the hospital see (for treatment).
CONSENTED_TYPES = ("Patient", "Observation", "DiagnosticReport", "Condition", "Encounter")
HBA1C = ("http://loinc.org", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood")
FHIR_JSON = "application/fhir+json"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LABELS_FILE = "demo-labels.json"
_LAB_OBSERVATION = ("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")
_LAB_REPORT = ("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")
_SECURITY = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

#: Every step of the scenario, in order: (name, title).
STEPS: tuple[tuple[str, str], ...] = (
    ("network", "Network of three organisations created"),
    ("practitioners", "Practitioners registered at each organisation"),
    ("import", "Synthea patients imported through the FHIR API"),
    ("smart", "SMART Backend Services tokens issued"),
    ("denied-before-consent", "Cross-organisation read denied without consent"),
    ("consent-given", "Patient signs a FHIR Consent"),
    ("cross-org-read", "Cross-organisation read permitted"),
    ("read-denied", "Read outside the consent denied"),
    ("duplicate-caught", "Duplicate lab test caught"),
    ("consent-revoked", "Consent revoked, access denied again"),
    ("break-glass", "Break-glass access and its review"),
    ("audit-trail", "Patient sees who accessed the record"),
    ("audit-proved", "Audit entry proved against a signed checkpoint"),
    ("ledger-verified", "Whole ledger verified"),
    ("tamper-caught", "Tampering caught by verify"),
)
STEP_NAMES: tuple[str, ...] = tuple(name for name, _ in STEPS)
#: Steps the rest of the scenario cannot run without.
_CRITICAL = frozenset({"network", "practitioners", "import", "smart"})


class DemoError(Exception):
    """The demo cannot start (e.g. its directory is in use or the port is taken)."""


class StepFailed(Exception):
    """A scenario check did not hold."""


def check(condition: object, message: str) -> None:
    """Fail the current step with ``message`` unless ``condition`` holds."""
    if not condition:
        raise StepFailed(message)


def _expect(response: httpx.Response, status: int, what: str) -> Any:
    """The JSON body of ``response``; the step fails unless it has ``status``."""
    if response.status_code != status:
        text = response.text[:300]
        raise StepFailed(f"{what}: expected HTTP {status}, got {response.status_code}: {text}")
    return response.json() if response.content else None


# -- the Synthea data -------------------------------------------------------------------------


def _data_file(name: str) -> Any:
    return resources.files("medledger").joinpath("demo_data", name)


def load_bundle(name: str) -> dict[str, Any]:
    """One Synthea patient bundle shipped with medledger (``medledger/demo_data``)."""
    doc: dict[str, Any] = json.loads(_data_file(name).read_text(encoding="utf-8"))
    return doc


def _codings(resource: Mapping[str, Any], element: str) -> set[tuple[Any, Any]]:
    out: set[tuple[Any, Any]] = set()
    value = resource.get(element) or []
    for concept in value if isinstance(value, list) else [value]:
        for c in concept.get("coding") or []:
            out.add((c.get("system"), c.get("code")))
    return out


def is_lab_result(resource: Mapping[str, Any]) -> bool:
    """A laboratory Observation or a laboratory DiagnosticReport (held by the laboratory)."""
    rtype = resource.get("resourceType")
    if rtype == "Observation":
        return _LAB_OBSERVATION in _codings(resource, "category")
    if rtype == "DiagnosticReport":
        return _LAB_REPORT in _codings(resource, "category")
    return False


def split_bundle(bundle: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The entries for the patient's home organisation and those for the laboratory."""
    home: list[dict[str, Any]] = []
    lab: list[dict[str, Any]] = []
    for entry in bundle.get("entry") or []:
        (lab if is_lab_result(entry["resource"]) else home).append(entry)
    return home, lab


def resolve_references(value: Any, mapping: Mapping[str, str], local: set[str], org: str) -> Any:
    """References of a resource ready for a transaction posted to ``org``.

    ``urn:uuid`` references to entries of the same Bundle (``local``) stay for the
    server to rewrite; those to resources already imported (``mapping``, e.g. the
    patient's Encounter at the hospital from a lab result) become ``Type/id``; an
    Encounter's ``serviceProvider`` becomes the organisation holding it; any other
    reference to something not imported (Synthea's Practitioner and Organization)
    keeps only its ``display``.
    """
    if isinstance(value, list):
        items = [resolve_references(v, mapping, local, org) for v in value]
        return [v for v in items if v is not None]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "reference" and isinstance(item, str) and item.startswith("urn:"):
            if item in local:
                out[key] = item
            elif item in mapping:
                out[key] = mapping[item]
            continue  # dangling: drop the reference, keep the display
        if key == "serviceProvider" and isinstance(item, dict):
            out[key] = {"reference": f"Organization/{org}", "display": ORG_NAMES[org]}
            continue
        new = resolve_references(item, mapping, local, org)
        if new is None or new == {} or new == []:
            continue
        out[key] = new
    return out or None


def transaction(entries: Sequence[Mapping[str, Any]], mapping: Mapping[str, str], org: str) -> Any:
    """A transaction Bundle creating ``entries`` (Synthea ``POST`` entries) at ``org``."""
    local = {str(e["fullUrl"]) for e in entries}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": e["fullUrl"],
                "resource": resolve_references(copy.deepcopy(e["resource"]), mapping, local, org),
                "request": {"method": "POST", "url": e["resource"]["resourceType"]},
            }
            for e in entries
        ],
    }


def _location(entry: Mapping[str, Any]) -> str:
    """``Type/id`` of a transaction-response entry (``Type/id/_history/n``)."""
    loc = str(entry["response"]["location"]).split("/_history")[0]
    return "/".join(loc.split("/")[-2:])


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ImportedPatient:
    """A Synthea patient after the import: ledger ids of everything and who holds them."""

    file: str
    name: str
    home: str
    id: str = ""
    #: source fullUrl -> "Type/ledger id"
    ids: dict[str, str] = field(default_factory=dict)
    #: "Type/ledger id" -> custodian organisation
    custodian: dict[str, str] = field(default_factory=dict)
    source: dict[str, dict[str, Any]] = field(default_factory=dict)  # fullUrl -> resource

    def held_by(self, org: str, rtype: str | None = None) -> list[str]:
        return [
            ref
            for ref, c in self.custodian.items()
            if c == org and (rtype is None or ref.startswith(rtype + "/"))
        ]

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for org in self.custodian.values():
            counts[org] = counts.get(org, 0) + 1
        return {"id": self.id, "name": self.name, "home": self.home, "resources": counts}


def _patient_name(resource: Mapping[str, Any]) -> str:
    for name in resource.get("name") or []:
        given = " ".join(name.get("given") or [])
        return f"{given} {name.get('family', '')}".strip()
    return "unnamed patient"


# -- SMART Backend Services clients ------------------------------------------------------------


@dataclass
class SmartClient:
    """A registered client holding its own ES384 key."""

    who: str
    client_id: str
    key: ClientKey
    scope: str

    def form(self, token_url: str, *, jti: str | None = None) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.key.assertion(self.client_id, token_url, jti=jti),
            "scope": self.scope,
        }


class Api:
    """The FHIR API in-process, as the demo's clients (one bearer token each)."""

    def __init__(
        self, http: httpx.AsyncClient, runtime: Any, token_url: str, fhir_base: str
    ) -> None:
        self.http = http
        self.fhir_base = fhir_base
        self.runtime = runtime
        self.token_url = token_url
        self.clients: dict[str, SmartClient] = {}
        self.tokens: dict[str, str] = {}

    async def register(self, who: str, org: str) -> SmartClient:
        """Register ``who`` (``system:ORG``, ``practitioner:ID`` or ``patient:ID``)."""
        kind, _, ident = who.partition(":")
        scope = {"system": "system/*.cruds", "practitioner": "user/*.cruds"}.get(
            kind, "patient/*.cruds"
        )
        key = ClientKey.generate("demo-" + uuid.uuid4().hex[:8])
        client = await self.runtime.require_smart().register_client(
            org=org,
            practitioner=ident if kind == "practitioner" else None,
            patient=ident if kind == "patient" else None,
            jwks={"keys": [key.public_jwk()]},
            scope=scope,
        )
        registered = SmartClient(who, client.client_id, key, scope)
        self.clients[who] = registered
        return registered

    async def token(self, who: str) -> str:
        """A bearer token for ``who`` from ``POST /auth/token`` (cached while valid)."""
        if who in self.tokens:
            return self.tokens[who]
        client = self.clients[who]
        r = await self.http.post("/auth/token", data=client.form(self.token_url))
        doc = _expect(r, 200, f"token for {who}")
        check(doc.get("token_type", "").lower() == "bearer", "the token endpoint gave no bearer")
        self.tokens[who] = str(doc["access_token"])
        return self.tokens[who]

    async def request(
        self,
        method: str,
        path: str,
        who: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        hdrs = {"Authorization": f"Bearer {await self.token(who)}", **(headers or {})}
        content = None
        if body is not None:
            hdrs["Content-Type"] = FHIR_JSON
            content = json.dumps(body).encode()
        return await self.http.request(
            method, path, headers=hdrs, content=content, params=dict(params or {})
        )


# -- the narrated run -----------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    title: str
    ok: bool
    detail: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "ok": self.ok,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


class Scenario:
    """One run of the demo in ``root`` (``root/node`` holds the network)."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.dd = DataDir(root / "node")
        self.results: list[StepResult] = []
        self.patients: list[ImportedPatient] = []
        self.api: Api | None = None
        self.consent_id = ""
        self.lab_result = ""  # "Observation/<id>": Tom's latest HbA1c at the laboratory
        self.new_result = ""  # the HbA1c the laboratory reports during the demo
        self.grey_permit_tx = ""
        self.grey_deny_tx = ""
        self.break_glass_tx = ""
        self.break_glass_id = ""
        self.first_checkpoint: Checkpoint | None = None
        self.imported = 0
        self.import_rate = 0.0

    # -- helpers ----------------------------------------------------------------------
    @property
    def tom(self) -> ImportedPatient:
        return self.patients[0]

    def _api(self) -> Api:
        assert self.api is not None
        return self.api

    def verifiers(self) -> list[NoteVerifier]:
        """Checkpoint verifiers from the genesis file (each organisation's node key)."""
        genesis = self.dd.genesis()
        return [
            NoteVerifier(
                signer_name(genesis["network"], org["id"]),
                VerifyKey(bytes.fromhex(org["node_key"])),
            )
            for org in genesis["orgs"]
        ]

    def client(self, who: str) -> Client:
        """``who``'s :class:`medledger.client.Client`, trusting checkpoints only when every
        organisation's node key (from the genesis file, not from the server) signed them."""
        api = self._api()
        registered = api.clients[who]
        verifiers = tuple(self.verifiers())
        return Client(
            api.fhir_base,
            client_id=registered.client_id,
            key=registered.key,
            scope=registered.scope,
            trust=Trust(verifiers, len(verifiers), checkpoint_origin(NETWORK)),
            token_url=api.token_url,
            http=api.http,
        )

    async def audit(self, patient: str) -> list[dict[str, Any]]:
        """The patient's access log as the ledger holds it (oldest first)."""
        feed: list[dict[str, Any]] = await self._api().runtime.access.audit_feed(patient)
        return feed

    async def last_access(self, patient: str, before: int) -> dict[str, Any]:
        """The one access.log entry written since the feed had ``before`` entries."""
        feed = await self.audit(patient)
        check(
            len(feed) == before + 1,
            f"expected exactly one new audit entry, found {len(feed) - before}",
        )
        return feed[-1]

    async def state(self, key: str) -> Any:
        raw = await self._api().runtime.node.state_get(key.encode())
        return None if raw is None else decode(raw)

    def story(self, text: str) -> None:
        self.console.print(f"  [dim]{escape(text)}[/]", highlight=False)

    async def step(
        self, name: str, title: str, body: Callable[[], Awaitable[str]], skip: str | None
    ) -> bool:
        """Run one step, print its outcome and record it; False when it failed."""
        self.console.print(f"[bold]{title}[/]")
        started = time.perf_counter()
        if skip is not None:
            result = StepResult(name, title, False, f"not run: step {skip!r} failed", 0.0)
        else:
            try:
                with self.console.status(f"{title}…", spinner="dots"):
                    detail = await body()
                result = StepResult(name, title, True, detail, time.perf_counter() - started)
            except StepFailed as exc:
                result = StepResult(name, title, False, str(exc), time.perf_counter() - started)
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                result = StepResult(name, title, False, text, time.perf_counter() - started)
        self.results.append(result)
        mark = "[green]✔[/]" if result.ok else "[red]✘[/]"
        self.console.print(
            f"  {mark} {escape(result.detail)} [dim]({result.seconds:.1f} s)[/]", highlight=False
        )
        return result.ok

    # -- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Every step of :data:`STEPS` in order; after a critical failure the rest are skipped."""
        from medledger.api.app import create_app
        from medledger.api.settings import Settings

        self.console.rule("[bold]medledger demo: sharing medical records on a verifiable ledger")
        self.console.print(f"data directory: {self.root}", highlight=False)
        bodies: dict[str, Callable[[], Awaitable[str]]] = {
            "network": self.step_network,
            "practitioners": self.step_practitioners,
            "import": self.step_import,
            "smart": self.step_smart,
            "denied-before-consent": self.step_denied_before_consent,
            "consent-given": self.step_consent_given,
            "cross-org-read": self.step_cross_org_read,
            "read-denied": self.step_read_denied,
            "duplicate-caught": self.step_duplicate_caught,
            "consent-revoked": self.step_consent_revoked,
            "break-glass": self.step_break_glass,
            "audit-trail": self.step_audit_trail,
            "audit-proved": self.step_audit_proved,
            "ledger-verified": self.step_ledger_verified,
            "tamper-caught": self.step_tamper_caught,
        }
        assert tuple(bodies) == STEP_NAMES
        titles = dict(STEPS)
        failed: str | None = None

        async def run_steps(names: Sequence[str]) -> None:
            nonlocal failed
            for name in names:
                ok = await self.step(name, titles[name], bodies[name], failed)
                if not ok and failed is None and name in _CRITICAL:
                    failed = name

        await run_steps(["network"])
        api_steps = [n for n in STEP_NAMES[1:] if n not in ("ledger-verified", "tamper-caught")]
        if failed is None:
            # the API as clients reach it, in this process: the same app `serve` runs
            settings = Settings.for_listen(self.dd.path, port=DEFAULT_PORT)
            app = create_app(settings)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url=settings.base_url,
                    timeout=120,
                ) as http,
            ):
                self.api = Api(http, app.state.runtime, settings.token_url, settings.fhir_base)
                await run_steps(api_steps)
            self._write_labels()
        else:
            await run_steps(api_steps)
        if failed != "network":
            failed = None  # the ledger can be verified whatever the scenario did with it
        await run_steps(["ledger-verified", "tamper-caught"])

    def _write_labels(self) -> None:
        """Display names of the demo identities for the portal's sign-in picker."""
        labels: dict[str, str] = {}
        for pid, org, roles in PRACTITIONERS:
            labels[pid] = f"{pid} ({'/'.join(roles)}, {ORG_NAMES[org]})"
        for pat in self.patients:
            if pat.id:
                labels[pat.id] = f"{pat.name} (patient of {ORG_NAMES[pat.home]})"
        self.dd.write_json(self.dd.path / LABELS_FILE, labels)

    # -- the steps ------------------------------------------------------------------------------
    async def step_network(self) -> str:
        self.story(
            "One embedded node holds the keys of three member organisations; consent is "
            "opt-in: nothing is shared across organisations without the patient's consent."
        )
        node = await self.dd.init_embedded(
            network=NETWORK,
            orgs=list(ORGS),
            policy={"consent_default": "opt-in", "break_glass_minutes": 60},
        )
        try:
            orgs = await node.state_scan(b"org/")
            height = node.head.height
        finally:
            await node.close()
        check(len(orgs) == len(ORGS), f"expected {len(ORGS)} organisations, found {len(orgs)}")
        names = ", ".join(name for _, name in ORGS)
        return f"{names} on network {NETWORK} (genesis block {height})"

    async def step_practitioners(self) -> str:
        self.story("Each organisation's administrator registers its staff with their roles.")
        runtime = self._api().runtime
        passphrase = self.dd.passphrase()
        for pid, org, roles in PRACTITIONERS:
            ident = self.dd.keystore.create(pid, passphrase)
            await runtime.submitter.submit(
                self.dd.identity(f"admin-{org}").signing,
                "principal.register",
                {
                    "id": pid,
                    "kind": "practitioner",
                    "roles": list(roles),
                    "pub": ident.signing.public.raw,
                },
            )
        for pid, org, roles in PRACTITIONERS:
            principal = await self.state(f"principal/{pid}")
            check(
                isinstance(principal, dict)
                and principal.get("org") == org
                and principal.get("status") == "active"
                and sorted(principal.get("roles") or []) == sorted(roles),
                f"{pid} is not an active {'/'.join(roles)} of {org} on the ledger",
            )
        return ", ".join(f"{pid} ({'/'.join(roles)}, {org})" for pid, org, roles in PRACTITIONERS)

    async def step_import(self) -> str:
        self.story(
            "Each Synthea patient's encounters, conditions and vital signs go to their home "
            "organisation, lab results to the laboratory: each organisation posts a FHIR "
            "transaction Bundle with its own system client; records are encrypted, the "
            "ledger holds only salted commitments."
        )
        api = self._api()
        for org, _ in ORGS:
            await api.register(f"system:{org}", org)
        plans = []
        for file, home in PATIENTS:
            bundle = load_bundle(file)
            patient_entry = next(
                e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
            )
            pat = ImportedPatient(file, _patient_name(patient_entry["resource"]), home)
            pat.source = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
            self.patients.append(pat)
            plans.append((pat, *split_bundle(bundle)))
        total = sum(len(h) + len(lab) for _, h, lab in plans)
        started = time.perf_counter()
        with Progress(
            TextColumn("  importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task("import", total=total)

            async def post(pat: ImportedPatient, org: str, entries: list[dict[str, Any]]) -> None:
                r = await api.request(
                    "POST", "/fhir", f"system:{org}", body=transaction(entries, pat.ids, org)
                )
                doc = _expect(r, 200, f"transaction of {pat.name}'s records at {org}")
                responses = doc.get("entry") or []
                check(
                    len(responses) == len(entries),
                    f"{org} answered {len(responses)} entries for {len(entries)}",
                )
                for entry, answer in zip(entries, responses, strict=True):
                    ref = _location(answer)
                    pat.ids[entry["fullUrl"]] = ref
                    pat.custodian[ref] = org
                progress.advance(task, len(entries))

            async def one(pat: ImportedPatient, home: list[Any], lab: list[Any]) -> None:
                await post(pat, pat.home, home)  # the Patient first: lab results refer to it
                pat.id = next(ref for ref in pat.ids.values() if ref.startswith("Patient/"))[8:]
                if lab:
                    await post(pat, LAB_ORG, lab)

            await asyncio.gather(*(one(p, h, lab) for p, h, lab in plans))
        seconds = time.perf_counter() - started
        self.imported = total
        self.import_rate = total / seconds if seconds else 0.0
        per_org = {org: sum(len(p.held_by(org)) for p in self.patients) for org, _ in ORGS}
        check(sum(per_org.values()) == total, "not every resource was stored")
        for pat in self.patients:
            state = await self.state(f"patient/{pat.id}")
            orgs = set(state.get("orgs") or []) if isinstance(state, dict) else set()
            check(
                {pat.home, LAB_ORG} <= orgs,
                f"{pat.name} is not linked to {pat.home} and {LAB_ORG} on the ledger",
            )
        # the record for the scenario: Tom's latest HbA1c, held by the laboratory
        tom = self.tom
        hba1c = [
            (r["effectiveDateTime"], url)
            for url, r in tom.source.items()
            if r["resourceType"] == "Observation" and (HBA1C[0], HBA1C[1]) in _codings(r, "code")
        ]
        check(hba1c, f"{tom.name} has no HbA1c result in the sample data")
        self.lab_result = tom.ids[max(hba1c)[1]]
        check(tom.custodian[self.lab_result] == LAB_ORG, "the HbA1c result is not at the lab")
        held = ", ".join(f"{ORG_NAMES[o]} {n}" for o, n in per_org.items())
        return (
            f"{total} resources of {len(self.patients)} patients "
            f"({', '.join(p.name for p in self.patients)}) in {seconds:.1f} s "
            f"({self.import_rate:.0f}/s): {held}"
        )

    async def step_smart(self) -> str:
        self.story(
            "Every practitioner and patient gets a SMART Backend Services client: it signs a "
            "JWT with its own private key and exchanges it at /auth/token for a 5-minute token."
        )
        api = self._api()
        for pid, org, _ in PRACTITIONERS:
            await api.register(f"practitioner:{pid}", org)
        for pat in self.patients:
            await api.register(f"patient:{pat.id}", pat.home)
        for who in api.clients:
            await api.token(who)
        # no token: refused before anything is read
        r = await api.http.get(f"/fhir/{self.lab_result}")
        check(r.status_code == 401, f"a read without a token answered {r.status_code}")
        check("Bearer" in r.headers.get("www-authenticate", ""), "401 without a Bearer challenge")
        # a replayed assertion (same jti) is refused
        client = api.clients["practitioner:dr-grey"]
        jti = str(uuid.uuid4())
        first = await api.http.post("/auth/token", data=client.form(api.token_url, jti=jti))
        _expect(first, 200, "token with a fresh assertion")
        again = await api.http.post("/auth/token", data=client.form(api.token_url, jti=jti))
        check(again.status_code in (400, 401), f"a replayed jti answered {again.status_code}")
        return (
            f"{len(api.tokens)} clients authenticated with ES384 private-key JWTs; "
            "no token -> 401, replayed assertion -> refused"
        )

    async def step_denied_before_consent(self) -> str:
        tom = self.tom
        self.story(
            f"Dr Grey at {ORG_NAMES['hospital']} asks for {tom.name}'s HbA1c result, held by "
            f"{ORG_NAMES[LAB_ORG]}. {tom.name} has not consented to sharing with the hospital."
        )
        before = len(await self.audit(tom.id))
        r = await self._api().request("GET", f"/fhir/{self.lab_result}", "practitioner:dr-grey")
        check(r.status_code == 403, f"expected 403, got {r.status_code}")
        check(r.json().get("resourceType") == "OperationOutcome", "403 without OperationOutcome")
        entry = await self.last_access(tom.id, before)
        check(
            entry.get("outcome") == "deny" and entry.get("actor") == "dr-grey",
            f"the denial was not logged as such: {entry.get('outcome')} by {entry.get('actor')}",
        )
        return f"403 Forbidden, logged on the ledger (rule {entry.get('rule')})"

    async def step_consent_given(self) -> str:
        tom = self.tom
        self.story(
            f"{tom.name} consents: {ORG_NAMES['hospital']} may see his "
            f"{', '.join(CONSENTED_TYPES)} records for treatment. The FHIR Consent becomes a "
            "consent.grant transaction signed with his own key."
        )
        api = self._api()
        # the patient keeps the checkpoint he saw now, to check later that the log only grew
        async with self.client(f"patient:{tom.id}") as client:
            self.first_checkpoint = await client.checkpoint()
        consent = consent_resource(tom.id, "hospital", CONSENTED_TYPES)
        r = await api.request("POST", "/fhir/Consent", f"patient:{tom.id}", body=consent)
        created = _expect(r, 201, "Consent create")
        self.consent_id = str(created["id"])
        check(created.get("status") == "active", "the new Consent is not active")
        # on the ledger: a consent.grant signed by the patient's own key
        state = await self.state(f"consent/{tom.id}/{self.consent_id}")
        check(isinstance(state, dict) and state.get("status") == "active", "consent not on ledger")
        principal = await self.state(f"principal/{tom.id}")
        keys = principal.get("keys") or [] if isinstance(principal, dict) else []
        grants = [
            t
            for t in await self._txs_of_type("consent.grant")
            if t.payload.get("consent", {}).get("id") == self.consent_id
        ]
        check(len(grants) == 1, "no consent.grant transaction for the new Consent")
        signer = grants[0].signer.hex()
        check(signer in keys, "the consent.grant is not signed by the patient's key")
        return (
            f"Consent/{self.consent_id[:8]}… active; consent.grant signed by the patient's "
            f"own key {signer[:12]}…"
        )

    async def _txs_of_type(self, type_: str) -> list[Transaction]:
        node = self._api().runtime.node
        out: list[Transaction] = []
        start = 0
        while True:
            recs = await node.list_txs(start, 1000)
            out.extend(t for t in (Transaction.from_bytes(r.raw) for r in recs) if t.type == type_)
            if len(recs) < 1000:
                return out
            start += len(recs)

    async def step_cross_org_read(self) -> str:
        tom = self.tom
        self.story(
            f"Dr Grey reads the HbA1c result held by {ORG_NAMES[LAB_ORG]}: the laboratory's "
            "node decides on its ledger copy, logs the access, wraps the record key for the "
            "hospital, and the hospital checks the ciphertext against the ledger commitment."
        )
        api = self._api()
        before = len(await self.audit(tom.id))
        r = await api.request("GET", f"/fhir/{self.lab_result}", "practitioner:dr-grey")
        obs = _expect(r, 200, "cross-organisation read")
        source = tom.source[next(u for u, ref in tom.ids.items() if ref == self.lab_result)]
        check(
            obs.get("valueQuantity", {}).get("value") == source["valueQuantity"]["value"]
            and obs.get("effectiveDateTime") == source["effectiveDateTime"],
            "the decrypted result differs from what the laboratory imported",
        )
        entry = await self.last_access(tom.id, before)
        check(
            entry.get("outcome") == "permit"
            and entry.get("rule") == "consent"
            and self.consent_id in (entry.get("consents") or []),
            f"the read was not logged as permitted by the consent: {entry}",
        )
        self.grey_permit_tx = str(entry["tx"])
        # the unified timeline: everything the consent allows, from every custodian
        before = len(await self.audit(tom.id))
        r = await api.request("GET", f"/fhir/Patient/{tom.id}/$everything", "practitioner:dr-grey")
        bundle = _expect(r, 200, "$everything")
        resources = [
            e["resource"]
            for e in bundle.get("entry") or []
            if e.get("search", {}).get("mode") != "outcome"
        ]
        notes = [
            e["resource"]
            for e in bundle.get("entry") or []
            if e.get("resource", {}).get("resourceType") == "OperationOutcome"
        ]
        seen_types = {r["resourceType"] for r in resources}
        check(seen_types <= set(CONSENTED_TYPES), f"types outside the consent: {seen_types}")
        custodians = {tom.custodian.get(f"{r['resourceType']}/{r['id']}") for r in resources}
        check({tom.home, LAB_ORG} <= custodians, f"records came only from {custodians}")
        expected = sum(
            len(tom.held_by(org, t)) for org in (tom.home, LAB_ORG) for t in CONSENTED_TYPES
        )
        check(len(resources) == expected, f"{len(resources)} records returned, {expected} allowed")
        withheld_text = " ".join(str(i.get("diagnostics", "")) for n in notes for i in n["issue"])
        not_consented = sorted({ref.split("/")[0] for ref in tom.custodian} - set(CONSENTED_TYPES))
        check(
            all(t in withheld_text for t in not_consented),
            f"no withheld notice for {not_consented}: {withheld_text!r}",
        )
        await self.last_access(tom.id, before)  # one access.log for the whole page
        return (
            f"200 OK, the result decrypted and matches the laboratory's; $everything: "
            f"{len(resources)} records from {ORG_NAMES[tom.home]} and {ORG_NAMES[LAB_ORG]}, "
            f"withheld: {', '.join(not_consented)}"
        )

    async def step_read_denied(self) -> str:
        tom = self.tom
        refs = tom.held_by(tom.home, "MedicationRequest") or tom.held_by(tom.home, "Procedure")
        check(refs, f"{tom.name} has no MedicationRequest or Procedure to ask for")
        ref = refs[0]
        self.story(f"Dr Grey asks for a {ref.split('/')[0]}, which the consent does not cover.")
        before = len(await self.audit(tom.id))
        r = await self._api().request("GET", f"/fhir/{ref}", "practitioner:dr-grey")
        check(r.status_code == 403, f"expected 403, got {r.status_code}")
        entry = await self.last_access(tom.id, before)
        check(entry.get("outcome") == "deny", "the denial was not logged")
        self.grey_deny_tx = str(entry["tx"])
        return f"403 Forbidden for {ref.split('/')[0]}, logged (rule {entry.get('rule')})"

    async def step_duplicate_caught(self) -> str:
        tom = self.tom
        api = self._api()
        taken = datetime.now(UTC).replace(microsecond=0) - timedelta(days=12)
        self.story(
            f"The laboratory reports a new HbA1c for {tom.name} (taken {taken.date()}). Later "
            "Dr Grey is about to order an HbA1c: the duplicate check looks at every custodian."
        )
        result = lab_observation(tom.id, when=_iso(taken), value=6.4)
        r = await api.request("POST", "/fhir/Observation", "practitioner:tech-lab", body=result)
        created = _expect(r, 201, "the laboratory's new result")
        self.new_result = f"Observation/{created['id']}"
        tom.custodian[self.new_result] = LAB_ORG
        since = (datetime.now(UTC) - timedelta(days=90)).date().isoformat()
        r = await api.request(
            "GET",
            "/fhir/Observation/$duplicate-check",
            "practitioner:dr-grey",
            params={"patient": tom.id, "code": f"{HBA1C[0]}|{HBA1C[1]}", "since": since},
        )
        bundle = _expect(r, 200, "$duplicate-check")
        found = [
            e["resource"]
            for e in bundle.get("entry") or []
            if e.get("resource", {}).get("resourceType") == "Observation"
        ]
        check(found, "the duplicate check found no recent result")
        check(
            f"Observation/{found[0]['id']}" == self.new_result,
            "the most recent result found is not the laboratory's new one",
        )
        check(tom.custodian[self.new_result] == LAB_ORG, "the result is not at the laboratory")
        return (
            f"found the HbA1c of {taken.date()} ({found[0]['valueQuantity']['value']} %) held by "
            f"{ORG_NAMES[LAB_ORG]}: no need to order it again"
        )

    async def step_consent_revoked(self) -> str:
        tom = self.tom
        api = self._api()
        self.story(f"{tom.name} withdraws his consent; Dr Grey asks for the result again.")
        r = await api.request("DELETE", f"/fhir/Consent/{self.consent_id}", f"patient:{tom.id}")
        _expect(r, 200, "Consent revoke")
        state = await self.state(f"consent/{tom.id}/{self.consent_id}")
        check(isinstance(state, dict) and state.get("status") == "revoked", "consent not revoked")
        r = await api.request("GET", f"/fhir/Consent/{self.consent_id}", f"patient:{tom.id}")
        check(_expect(r, 200, "Consent read")["status"] == "inactive", "Consent still active")
        before = len(await self.audit(tom.id))
        r = await api.request("GET", f"/fhir/{self.lab_result}", "practitioner:dr-grey")
        check(r.status_code == 403, f"after the revocation the read answered {r.status_code}")
        entry = await self.last_access(tom.id, before)
        check(entry.get("outcome") == "deny", "the denial was not logged")
        return "consent.revoke signed by the patient; the same read now 403 Forbidden, logged"

    async def step_break_glass(self) -> str:
        tom = self.tom
        api = self._api()
        runtime = api.runtime
        emergency = {"X-Purpose-Of-Use": "ETREAT", "X-Break-Glass": "true"}
        self.story(
            f"{tom.name} arrives unconscious at {ORG_NAMES['hospital']}'s emergency department. "
            "Dr Ross, emergency clinician, needs his lab results; there is no consent."
        )
        r = await api.request(
            "GET", f"/fhir/{self.lab_result}", "practitioner:dr-ross", headers=emergency
        )
        check(r.status_code == 403, f"break-glass without a declaration answered {r.status_code}")
        receipt = await runtime.submitter.submit(
            self.dd.identity("dr-ross").signing,
            "breakglass.declare",
            {
                "patient": tom.id,
                "reason": "unconscious patient in the emergency department",
                "resource_types": [],
            },
        )
        self.break_glass_id = receipt.tx_id.hex()
        before = len(await self.audit(tom.id))
        r = await api.request(
            "GET", f"/fhir/{self.lab_result}", "practitioner:dr-ross", headers=emergency
        )
        _expect(r, 200, "break-glass read")
        entry = await self.last_access(tom.id, before)
        check(
            entry.get("break_glass") is True
            and entry.get("rule") == "break-glass"
            and entry.get("purpose") == "ETREAT",
            f"the access was not logged as break-glass: {entry}",
        )
        self.break_glass_tx = str(entry["tx"])
        review = await self.state(f"review/{self.break_glass_id}")
        check(isinstance(review, dict) and review.get("status") == "open", "no open review")
        await runtime.submitter.submit(
            self.dd.identity("po-hospital").signing,
            "breakglass.review",
            {"id": self.break_glass_id, "outcome": "justified", "note": "emergency admission"},
        )
        review = await self.state(f"review/{self.break_glass_id}")
        check(
            isinstance(review, dict)
            and review.get("status") == "closed"
            and review.get("outcome") == "justified",
            "the review is not closed as justified",
        )
        return (
            "denied until declared; breakglass.declare signed by Dr Ross; read permitted with "
            "purpose ETREAT and logged as break-glass; reviewed by po-hospital: justified"
        )

    async def step_audit_trail(self) -> str:
        tom = self.tom
        self.story(f"{tom.name} opens 'who saw my data': every decision, as FHIR AuditEvents.")
        r = await self._api().request(
            "GET",
            "/fhir/AuditEvent",
            f"patient:{tom.id}",
            params={"patient": tom.id, "_count": "100"},
        )
        bundle = _expect(r, 200, "AuditEvent search")
        events = {
            e["resource"]["id"]: e["resource"]
            for e in bundle.get("entry") or []
            if e.get("resource", {}).get("resourceType") == "AuditEvent"
        }
        feed = await self.audit(tom.id)
        check(len(events) == len(feed), f"{len(events)} AuditEvents for {len(feed)} log entries")
        for tx, what in (
            (self.grey_permit_tx, "Dr Grey's permitted read"),
            (self.grey_deny_tx, "Dr Grey's denied read"),
            (self.break_glass_tx, "Dr Ross's break-glass read"),
        ):
            check(tx in events, f"{what} is missing from the audit trail")
        check(events[self.grey_permit_tx].get("outcome") == "0", "the permit is not outcome 0")
        check(events[self.grey_deny_tx].get("outcome") == "4", "the denial is not outcome 4")
        labels = events[self.break_glass_tx].get("meta", {}).get("security") or []
        check(
            any(c.get("code") == "BTG" for c in labels), "the break-glass event is not labelled BTG"
        )
        denied = sum(1 for e in events.values() if e.get("outcome") != "0")
        return (
            f"{len(events)} AuditEvents ({denied} denied), the break-glass access labelled BTG "
            "with purpose ETREAT"
        )

    async def step_audit_proved(self) -> str:
        tom = self.tom
        self.story(
            f"{tom.name} checks the break-glass entry himself: its transaction, its inclusion "
            "proof, the checkpoint signed by the network's nodes, and that the log only grew "
            "since the checkpoint he kept when he consented."
        )
        first = self.first_checkpoint
        check(first is not None, "no earlier checkpoint was kept")
        assert first is not None
        # medledger.client checks it all here: the bytes hash to the entry's id, the
        # patient-visible signature, the inclusion proof, the checkpoint's signatures
        async with self.client(f"patient:{tom.id}") as client:
            proof = await client.access_proof(self.break_glass_tx)
            check(
                proof.transaction.type == "access.log" and proof.entry.get("break_glass") is True,
                "the proved transaction is not the break-glass access entry",
            )
            cp = await client.prove_append_only(first, proof.checkpoint)
        return (
            f"leaf {proof.leaf_index} of {cp.size}: inclusion proof ({len(proof.audit_path)} "
            "hashes) verified against a checkpoint signed by the network's node keys; log "
            f"{first.size} -> {cp.size} proved append-only"
        )

    async def step_ledger_verified(self) -> str:
        self.story(
            "verify recomputes every leaf hash, block link, log and state root, and every "
            "transaction, block and checkpoint signature from genesis."
        )
        report = await asyncio.to_thread(_verify_file, self.dd.path / "ledger.db")
        check(report.ok, f"verify failed: {report.failure}")
        return (
            f"OK: {report.blocks} blocks, {report.transactions} transactions, "
            f"{report.checkpoints} checkpoints"
        )

    async def step_tamper_caught(self) -> str:
        check(self.break_glass_tx, "no break-glass entry to tamper with")
        self.story(
            "Someone edits a copy of the ledger to erase the break-glass flag from the "
            "emergency access entry (re-encoding it canonically and fixing up its id)."
        )
        tampered = self.root / "tampered"
        tampered.mkdir(exist_ok=True)
        db = tampered / "ledger.db"
        await asyncio.to_thread(_copy_sqlite, self.dd.path / "ledger.db", db)
        index = await asyncio.to_thread(_erase_break_glass, db, bytes.fromhex(self.break_glass_tx))
        bad = await asyncio.to_thread(_verify_file, db)
        check(not bad.ok, "verify did not notice the edit")
        assert bad.failure is not None
        check(
            bad.failure.index == index,
            f"verify blamed {bad.failure}, not the edited transaction #{index}",
        )
        good = await asyncio.to_thread(_verify_file, self.dd.path / "ledger.db")
        check(good.ok, f"the served ledger no longer verifies: {good.failure}")
        where = f"block {bad.failure.height}, tx #{bad.failure.index}: {bad.failure.what}"
        return f"verify on the edited copy fails at {where}; the served ledger still verifies"

    # -- summary ------------------------------------------------------------------------------
    def summary(self, seconds: float) -> dict[str, Any]:
        ok = bool(self.results) and all(r.ok for r in self.results)
        return {
            "ok": ok,
            "seconds": round(seconds, 2),
            "data_dir": str(self.root),
            "network": NETWORK,
            "organisations": [{"id": oid, "name": name} for oid, name in ORGS],
            "practitioners": [
                {"id": pid, "org": org, "roles": list(roles)} for pid, org, roles in PRACTITIONERS
            ],
            "patients": [p.to_json() for p in self.patients],
            "imported": self.imported,
            "import_per_second": round(self.import_rate, 1),
            "steps": [r.to_json() for r in self.results],
        }


def consent_resource(patient: str, org: str, types: Sequence[str]) -> dict[str, Any]:
    """A FHIR R4 Consent: ``patient`` permits ``org`` to see ``types`` for treatment."""
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
        "dateTime": _iso(datetime.now(UTC)),
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": (
                                    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
                                ),
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": f"Organization/{org}"},
                }
            ],
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
            ],
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": t} for t in types],
        },
    }


def lab_observation(patient: str, *, when: str, value: float) -> dict[str, Any]:
    """A final laboratory HbA1c result for ``patient``."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": _LAB_OBSERVATION[0], "code": _LAB_OBSERVATION[1]},
                ]
            }
        ],
        "code": {
            "coding": [{"system": HBA1C[0], "code": HBA1C[1], "display": HBA1C[2]}],
            "text": HBA1C[2],
        },
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "issued": when,
        "valueQuantity": {
            "value": value,
            "unit": "%",
            "system": "http://unitsofmeasure.org",
            "code": "%",
        },
    }


# -- ledger files -------------------------------------------------------------------------------


def _verify_file(path: Path) -> VerifyReport:
    store = SqliteStore(path)
    try:
        return verify_ledger(store)
    finally:
        store.close()


def _copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database (the backup API, safe while WAL is in use)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def _erase_break_glass(db: Path, tx_id: bytes) -> int:
    """Rewrite the access.log ``tx_id`` in ``db`` as if break-glass had not been used.

    The tamperer re-encodes the edited transaction canonically and stores it under
    its new id, as a careless audit would never notice; returns its log index.
    """
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT idx, raw FROM txs WHERE tx_id=?", (tx_id,)).fetchone()
        if row is None:
            raise StepFailed(f"transaction {tx_id.hex()} is not in the copy")
        index, raw = int(row[0]), bytes(row[1])
        env = decode(raw)
        env["payload"]["break_glass"] = False
        env["payload"]["rule"] = "consent"
        new = encode(env)
        conn.execute(
            "UPDATE txs SET raw=?, tx_id=? WHERE idx=?",
            (new, hashlib.sha256(new).digest(), index),
        )
    conn.close()
    return index


# -- entry points -------------------------------------------------------------------------------


async def run_demo(root: Path, *, console: Console | None = None) -> dict[str, Any]:
    """Run the scenario in ``root`` (a new or empty directory); returns the summary.

    The summary's ``steps`` hold one ``{"name", "title", "ok", "detail", "seconds"}``
    per step of :data:`STEPS`; ``ok`` is true when every step passed.
    """
    console = console or Console(highlight=False)
    _check_root(root)
    started = time.perf_counter()
    scenario = Scenario(root, console)
    await scenario.run()
    summary = scenario.summary(time.perf_counter() - started)
    passed = sum(1 for s in summary["steps"] if s["ok"])
    if summary["ok"]:
        console.rule(f"[bold green]all {passed} steps passed in {summary['seconds']:.1f} s")
    else:
        failed = [s["name"] for s in summary["steps"] if not s["ok"]]
        console.rule(f"[bold red]{len(failed)} step(s) failed: {', '.join(failed)}")
    return summary


def _check_root(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DemoError(
            f"{root} is not empty; give a new directory (to serve an earlier demo again: "
            f"medledger serve --demo --data-dir {root / 'node'})"
        )


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DemoError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from None


def portal_server(data_dir: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Any:
    """A uvicorn server of the API and the portal with the demo sign-in (``serve --demo``)."""
    import uvicorn

    from medledger.api.app import create_app
    from medledger.api.settings import Settings

    settings = Settings.for_listen(data_dir, host=host, port=port, demo=True)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve_portal(
    data_dir: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    console: Console | None = None,
) -> None:
    """Serve the portal of the demo network until interrupted (Ctrl-C)."""
    console = console or Console(highlight=False)
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    console.rule("[bold]the portal")
    console.print(f"open [bold]{url}[/] and sign in as a demo identity:", highlight=False)
    try:
        labels: dict[str, str] = json.loads((data_dir / LABELS_FILE).read_text())
    except (OSError, ValueError):
        labels = {}
    for pid, org, roles in PRACTITIONERS:
        console.print(f"  {pid:<12} {'/'.join(roles)} at {ORG_NAMES[org]}", highlight=False)
    for ident, label in labels.items():
        if ident.startswith("pat-"):
            console.print(f"  {label}: {ident}", highlight=False)
    console.print("  or an organisation's system client", highlight=False)
    console.print(f"FHIR API: {url}/fhir   (press Ctrl-C to stop)", highlight=False)
    portal_server(data_dir, host=host, port=port).run()
    console.print("stopped")


def main(
    data_dir: Path | None = None,
    *,
    serve: bool = True,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    json_output: bool = False,
) -> int:
    """``medledger demo``: run the scenario, print the summary, serve the portal; exit status.

    Exit status: 0 when every step passed (after serving, if asked), 1 when a step
    failed (nothing is served then), 2 when the demo cannot start.
    """
    # with --json the narration goes to stderr, so stdout is the summary alone
    console = Console(stderr=json_output, highlight=False)
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="medledger-demo-")) if data_dir is None else data_dir
    try:
        try:
            _check_root(root)
            if serve:
                _check_port(host, port)
        except DemoError as exc:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"error: {exc}", markup=False
            )
            return 2
        summary = asyncio.run(run_demo(root, console=console))
        if temporary:
            summary["data_dir"] = None  # removed on exit
        if json_output:
            print(json.dumps(summary, indent=2))
        if not summary["ok"]:
            return 1
        if serve:
            serve_portal(root / "node", host=host, port=port, console=console)
        return 0
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
