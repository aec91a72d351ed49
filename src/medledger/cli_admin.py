"""Administration commands: genesis, organisations, practitioners, patients, consent,
access checks and the audit trail. Registered on the main app by :mod:`medledger.cli`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from medledger.contracts.access import AccessRequest
from medledger.contracts.breakglass_v1 import declarations, overdue_reviews
from medledger.crypto.keystore import Identity
from medledger.datadir import DataDir, default_data_dir
from medledger.errors import MedledgerError
from medledger.node import Node, Receipt
from medledger.services.access import AccessService, decision_json
from medledger.services.submitter import Submitter

__all__ = ["register"]

out = Console(highlight=False)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Node data directory.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


class AdminError(MedledgerError):
    """A command-line usage error."""

    code = "usage"


def _dd(path: Path | None) -> DataDir:
    return DataDir(path if path is not None else default_data_dir())


def _emit(doc: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.print(text)


@dataclass
class Session:
    dd: DataDir
    node: Node
    submitter: Submitter
    access: AccessService

    def admin(self, org: str) -> Identity:
        return self.dd.identity(f"admin-{org}")

    def identity(self, name: str) -> Identity:
        return self.dd.identity(name)


@contextlib.asynccontextmanager
async def session(path: Path | None) -> AsyncIterator[Session]:
    dd = _dd(path)
    async with dd.node() as node:
        await node.start()
        sub = Submitter(node)
        keys = dict(node.signers)  # the org node keys open_node already loaded
        yield Session(dd, node, sub, AccessService(node, sub, keys))


def _submit(data_dir: Path | None, signer: str, type_: str, payload: dict[str, Any]) -> Receipt:
    """Sign one transaction with the keystore identity ``signer`` and wait for its commit."""

    async def go() -> Receipt:
        async with session(data_dir) as s:
            return await s.submitter.submit(s.identity(signer).signing, type_, payload)

    result: Receipt = _run(go())
    return result


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def _now() -> int:
    return int(time.time() * 1000)


# -- genesis ---------------------------------------------------------------------------

genesis_app = typer.Typer(help="Create a network.", no_args_is_help=True)


@genesis_app.command("new")
def genesis_new(
    orgs: Annotated[int, typer.Option("--orgs", min=1, max=50, help="Member organisations.")],
    data_dir: DataDirOpt = None,
    network: Annotated[str, typer.Option(help="Network id.")] = "medledger-local",
    opt_out: Annotated[
        bool, typer.Option("--opt-out", help="Share for treatment unless the patient denies.")
    ] = False,
    break_glass_minutes: Annotated[int, typer.Option(min=1)] = 60,
    json_: JsonOpt = False,
) -> None:
    """A genesis with fresh organisation keys, and an embedded ledger holding them all."""

    async def go() -> dict[str, Any]:
        dd = _dd(data_dir)
        ids = [(f"org-{i + 1}", f"Organisation {i + 1}") for i in range(orgs)]
        policy = {
            "consent_default": "opt-out" if opt_out else "opt-in",
            "break_glass_minutes": break_glass_minutes,
        }
        node = await dd.init_embedded(network=network, orgs=ids, policy=policy)
        try:
            return {
                "network": network,
                "data_dir": str(dd.path),
                "genesis": str(dd.genesis_file),
                "orgs": [oid for oid, _ in ids],
                "verifier_keys": node.verifier_keys(),
            }
        finally:
            await node.close()

    doc = _run(go())
    _emit(doc, json_, f"network {network} with {orgs} organisations in {doc['data_dir']}")


# -- organisations -------------------------------------------------------------------

org_app = typer.Typer(help="Propose and approve member organisations.", no_args_is_help=True)


@org_app.command("propose")
def org_propose(
    action: Annotated[str, typer.Argument(help="add or remove")],
    org: Annotated[str, typer.Option("--org", help="The organisation to add or remove.")],
    as_org: Annotated[str, typer.Option("--as", help="Proposing member organisation.")],
    name: Annotated[str | None, typer.Option(help="Display name (add).")] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Propose adding (with fresh node keys) or removing an organisation."""
    if action not in ("add", "remove"):
        raise AdminError("action must be add or remove")

    async def go() -> dict[str, Any]:
        async with session(data_dir) as s:
            if action == "add":
                ks = s.dd.keystore
                ident = ks.create(f"node-{org}", s.dd.passphrase())
                payload: dict[str, Any] = {
                    "action": "add",
                    "org": {
                        "id": org,
                        "name": name or org,
                        "node_key": ident.signing.public.raw,
                        "enc_key": ident.encryption.public.raw,
                        "enc_alg": ident.encryption.public.alg,
                    },
                }
            else:
                payload = {"action": "remove", "org": {"id": org}}
            r = await s.submitter.submit(s.admin(as_org).signing, "org.propose", payload)
            return {"proposal": r.tx_id.hex(), "index": r.index, "height": r.height}

    doc = _run(go())
    _emit(doc, json_, f"proposal {doc['proposal']}")


@org_app.command("approve")
def org_approve(
    proposal: str,
    as_org: Annotated[str, typer.Option("--as", help="Approving member organisation.")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Approve a proposal; it applies once a majority of members approved."""

    async def go() -> dict[str, Any]:
        async with session(data_dir) as s:
            r = await s.submitter.submit(
                s.admin(as_org).signing, "org.approve", {"proposal": proposal}
            )
            raw = await s.node.state_get(f"proposal/{proposal}".encode())
            from medledger.encoding import decode

            prop = decode(raw) if raw else {}
            return {
                "proposal": proposal,
                "status": prop.get("status"),
                "approvals": prop.get("approvals"),
                "index": r.index,
            }

    doc = _run(go())
    _emit(doc, json_, f"proposal {proposal}: {doc['status']} ({doc['approvals']})")


# -- practitioners ---------------------------------------------------------------------

practitioner_app = typer.Typer(help="Register practitioners and apps.", no_args_is_help=True)


@practitioner_app.command("add")
def practitioner_add(
    org: Annotated[str, typer.Option("--org", help="Organisation.")],
    role: Annotated[list[str], typer.Option("--role", help="Role (repeatable).")],
    pid: Annotated[str | None, typer.Option("--id", help="Principal id.")] = None,
    kind: Annotated[str, typer.Option(help="practitioner or app")] = "practitioner",
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Register a practitioner (keys created in the keystore), signed by the org admin."""
    pid = pid or f"pr-{secrets.token_hex(6)}"

    async def go() -> dict[str, Any]:
        async with session(data_dir) as s:
            ident = s.dd.keystore.create(pid, s.dd.passphrase())
            r = await s.submitter.submit(
                s.admin(org).signing,
                "principal.register",
                {
                    "id": pid,
                    "kind": kind,
                    "roles": sorted(set(role)),
                    "pub": ident.signing.public.raw,
                },
            )
            return {"id": pid, "org": org, "roles": sorted(set(role)), "index": r.index}

    doc = _run(go())
    _emit(doc, json_, f"registered {kind} {pid} at {org} as {', '.join(doc['roles'])}")


@practitioner_app.command("suspend")
def practitioner_suspend(
    pid: str,
    org: Annotated[str, typer.Option("--org")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Suspend a practitioner or app of the organisation."""

    r = _submit(data_dir, f"admin-{org}", "principal.suspend", {"id": pid})
    doc = {"id": pid, "status": "suspended", "index": r.index}
    _emit(doc, json_, f"{pid} suspended")


# -- patients ----------------------------------------------------------------------------

patient_app = typer.Typer(help="Register patients.", no_args_is_help=True)


@patient_app.command("add")
def patient_add(
    org: Annotated[str, typer.Option("--org", help="Registering (custodian) organisation.")],
    local_id: Annotated[
        str | None, typer.Option(help="The organisation's local identifier (kept off-ledger).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Also write the patient's key file here.")
    ] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Register a patient with a pseudonymous id and their own keys."""
    patient = "pat-" + secrets.token_hex(16)

    async def go() -> dict[str, Any]:
        async with session(data_dir) as s:
            ident = s.dd.keystore.create(patient, s.dd.passphrase())
            salt = secrets.token_bytes(16)
            local = local_id or secrets.token_hex(8)
            commitment = hashlib.sha256(salt + local.encode()).digest()
            links_file = s.dd.path / "local-links.json"
            links = json.loads(links_file.read_text()) if links_file.exists() else {}
            links[patient] = {"org": org, "local_id": local, "salt": salt.hex()}
            tmp = links_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(links, f, indent=2)
            os.replace(tmp, links_file)
            r = await s.submitter.submit(
                s.dd.identity(f"node-{org}").signing,
                "patient.register",
                {
                    "id": patient,
                    "links": [{"org": org, "commitment": commitment}],
                    "pub": ident.signing.public.raw,
                },
            )
            written = s.dd.path / "keys" / f"{patient}.json"
            if key_file is not None:
                data = written.read_bytes()
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                written = key_file
            return {"patient": patient, "org": org, "key_file": str(written), "index": r.index}

    doc = _run(go())
    _emit(doc, json_, f"patient {patient} (key file {doc['key_file']})")


# -- consent -------------------------------------------------------------------------------

consent_app = typer.Typer(
    help="Grant and revoke consent (signed by the patient).", no_args_is_help=True
)


@consent_app.command("grant")
def consent_grant(
    patient: Annotated[str, typer.Option("--patient")],
    to_org: Annotated[list[str], typer.Option("--to-org", help="Organisation (repeatable).")] = [],  # noqa: B006
    to_practitioner: Annotated[list[str], typer.Option("--to-practitioner")] = [],  # noqa: B006
    to_role: Annotated[list[str], typer.Option("--to-role")] = [],  # noqa: B006
    referred: Annotated[
        bool, typer.Option("--referred", help="Anyone holding a referral.")
    ] = False,
    purpose: Annotated[
        list[str], typer.Option("--purpose", help="PurposeOfUse (repeatable).")
    ] = [],  # noqa: B006
    rtype: Annotated[
        list[str], typer.Option("--type", help="FHIR resource type (repeatable).")
    ] = [],  # noqa: B006
    deny: Annotated[bool, typer.Option("--deny", help="A deny consent instead of permit.")] = False,
    start: Annotated[int | None, typer.Option(help="Valid from (ms since epoch).")] = None,
    end: Annotated[int | None, typer.Option(help="Valid until (ms since epoch).")] = None,
    cid: Annotated[str | None, typer.Option("--id", help="Consent id.")] = None,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Sign and submit a consent with the patient's own key."""
    actors = (
        [{"kind": "org", "id": o} for o in to_org]
        + [{"kind": "practitioner", "id": p} for p in to_practitioner]
        + [{"kind": "role", "id": r} for r in to_role]
        + ([{"kind": "referred"}] if referred else [])
    )
    consent_id = cid or "cons-" + secrets.token_hex(8)
    consent = {
        "id": consent_id,
        "patient": patient,
        "period": [start, end],
        "provision": {
            "type": "deny" if deny else "permit",
            "actors": actors,
            "purposes": purpose,
            "resource_types": rtype,
        },
    }

    r = _submit(data_dir, patient, "consent.grant", {"consent": consent})
    doc = {"consent": consent_id, "index": r.index, "tx_id": r.tx_id.hex()}
    _emit(doc, json_, f"consent {consent_id} recorded at log index {doc['index']}")


@consent_app.command("revoke")
def consent_revoke(
    patient: Annotated[str, typer.Option("--patient")],
    consent: Annotated[str, typer.Option("--consent", help="Consent id.")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Revoke a consent (signed with the patient's key)."""

    r = _submit(data_dir, patient, "consent.revoke", {"id": consent})
    doc = {"consent": consent, "status": "revoked", "index": r.index}
    _emit(doc, json_, f"consent {consent} revoked")


# -- access and audit ----------------------------------------------------------------------

access_app = typer.Typer(help="Access decisions.", no_args_is_help=True)


@access_app.command("check")
def access_check(
    actor: Annotated[str, typer.Option("--actor", help="Practitioner or app id.")],
    patient: Annotated[str, typer.Option("--patient")],
    purpose: Annotated[str, typer.Option("--purpose", help="PurposeOfUse, e.g. TREAT.")],
    rtype: Annotated[list[str], typer.Option("--type", help="FHIR resource type (repeatable).")],
    break_glass: Annotated[bool, typer.Option("--break-glass")] = False,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Decide an access request now, record the decision on the ledger, print it."""

    async def go() -> dict[str, Any]:
        async with session(data_dir) as s:
            org, _ = await s.access.actor_org(actor)
            req = AccessRequest(
                actor=actor,
                org=org,
                patient=patient,
                resource_types=tuple(rtype),
                purpose=purpose,
                time=_now(),
                break_glass=break_glass,
            )
            decision, receipt = await s.access.decide_and_log(req)
            doc = decision_json(decision)
            doc["logged"] = {"tx_id": receipt.tx_id.hex(), "index": receipt.index}
            return doc

    doc = _run(go())
    verdict = "PERMIT" if doc["permit"] else "DENY"
    _emit(
        doc,
        json_,
        f"{verdict} ({doc['rule']}): {doc['reason']}; "
        f"consents {', '.join(doc['consents']) or '-'}; logged as {doc['logged']['tx_id']}",
    )


breakglass_app = typer.Typer(help="Emergency (break-glass) access.", no_args_is_help=True)


@breakglass_app.command("declare")
def breakglass_declare(
    actor: Annotated[str, typer.Option("--actor", help="Emergency clinician id.")],
    patient: Annotated[str, typer.Option("--patient")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (required, no identifying details).")
    ],
    rtype: Annotated[
        list[str], typer.Option("--type", help="FHIR resource type (repeatable).")
    ] = [],  # noqa: B006
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Declare an emergency: opens a time-limited access window and a mandatory review."""
    if not reason.strip():
        raise AdminError("--reason must not be empty")

    r = _submit(
        data_dir,
        actor,
        "breakglass.declare",
        {"patient": patient, "reason": reason, "resource_types": rtype},
    )
    doc = {"id": r.tx_id.hex(), "index": r.index}
    _emit(doc, json_, f"break-glass declared: {doc['id']} (review required)")


@breakglass_app.command("review")
def breakglass_review(
    bid: Annotated[str, typer.Argument(help="Declaration id.")],
    reviewer: Annotated[str, typer.Option("--as", help="Privacy officer id.")],
    outcome: Annotated[str, typer.Option(help="justified or unjustified")],
    note: Annotated[str, typer.Option(help="Review note.")] = "",
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Close a break-glass review (signed by the organisation's privacy officer)."""
    r = _submit(
        data_dir, reviewer, "breakglass.review", {"id": bid, "outcome": outcome, "note": note}
    )
    doc = {"id": bid, "outcome": outcome, "index": r.index}
    _emit(doc, json_, f"review of {bid} closed: {outcome}")


@breakglass_app.command("reviews")
def breakglass_reviews(
    org: Annotated[str, typer.Option("--org", help="Organisation whose declarations to list.")],
    status: Annotated[str, typer.Option(help="open, closed or all")] = "open",
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """An organisation's break-glass declarations, their reviews and the reads under each."""
    if status not in ("open", "closed", "all"):
        raise AdminError("--status must be open, closed or all")

    async def go() -> list[dict[str, Any]]:
        dd = _dd(data_dir)
        async with dd.node(read_only=True) as node:
            now = _now()
            found: list[dict[str, Any]] = await node.read(
                lambda st: declarations(st, now, org=org, status=status)
            )
            return found

    items = _run(go())
    if json_:
        sys.stdout.write(json.dumps(items, indent=2, default=str) + "\n")
        return
    for d in items:
        if d["status"] == "open":
            state = "[bold red]OVERDUE[/]" if d["overdue"] else "open"
        else:
            state = escape(f"{d['outcome']} ({d['reviewer']})")
        out.print(
            f"{d['id']}  {escape(d['actor'])} -> {escape(d['patient'])}  {state}  "
            f"{len(d['reads'])} read(s)  reason: {escape(d['reason'] or '')}"
        )
    if not items:
        out.print(f"no {'' if status == 'all' else status + ' '}break-glass declarations of {org}")


def audit(
    patient: Annotated[str, typer.Option("--patient")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Every access decision about a patient, oldest first."""

    async def go() -> dict[str, Any]:
        dd = _dd(data_dir)
        async with dd.node(read_only=True) as node:
            svc = AccessService(node, Submitter(node), {})
            entries = await svc.audit_feed(patient)
            overdue = await node.read(lambda st: overdue_reviews(st, _now()))
            return {"patient": patient, "entries": entries, "overdue_reviews": overdue}

    doc = _run(go())
    if json_:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    for e in doc["entries"]:
        bg = " [bold red]BREAK-GLASS[/]" if e.get("break_glass") else ""
        out.print(
            f"{e.get('time')}  {e.get('outcome', '?').upper():6} {e.get('actor')} @ {e.get('org')} "
            f"{e.get('purpose')} {','.join(e.get('resource_types') or [])}{bg}"
        )
    if not doc["entries"]:
        out.print("no access decisions recorded")


def register(app: typer.Typer) -> None:
    app.add_typer(genesis_app, name="genesis")
    app.add_typer(org_app, name="org")
    app.add_typer(practitioner_app, name="practitioner")
    app.add_typer(patient_app, name="patient")
    app.add_typer(consent_app, name="consent")
    app.add_typer(access_app, name="access")
    app.add_typer(breakglass_app, name="breakglass")
    app.command("audit")(audit)
