"""The administration CLI, run as a real subprocess against an embedded 3-organisation network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MEDLEDGER = str(Path(sys.executable).with_name("medledger"))


def run(data_dir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MEDLEDGER_PASSPHRASE", None)
    proc = subprocess.run(
        [MEDLEDGER, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def js(data_dir: Path, *args: str) -> Any:
    return json.loads(run(data_dir, *args, "--json").stdout)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("net") / "node"
    doc = js(d, "genesis", "new", "--orgs", "3")
    assert doc["orgs"] == ["org-1", "org-2", "org-3"]
    assert len(doc["verifier_keys"]) == 3
    return d


def test_consent_lifecycle_decides_and_audits(net: Path) -> None:
    js(net, "practitioner", "add", "--org", "org-2", "--role", "physician", "--id", "dr-a")
    patient = js(net, "patient", "add", "--org", "org-1")["patient"]
    assert patient.startswith("pat-")

    def check() -> Any:
        return js(
            net,
            "access",
            "check",
            "--actor",
            "dr-a",
            "--patient",
            patient,
            "--purpose",
            "TREAT",
            "--type",
            "Observation",
        )

    first = check()
    assert first["permit"] is False and first["rule"] == "default"
    js(
        net,
        "consent",
        "grant",
        "--patient",
        patient,
        "--to-org",
        "org-2",
        "--purpose",
        "TREAT",
        "--type",
        "Observation",
        "--id",
        "c-1",
    )
    second = check()
    assert second["permit"] is True and second["consents"] == ["c-1"]
    js(net, "consent", "revoke", "--patient", patient, "--consent", "c-1")
    third = check()
    assert third["permit"] is False

    feed = js(net, "audit", "--patient", patient)["entries"]
    assert [e["outcome"] for e in feed] == ["deny", "permit", "deny"]
    assert all(e["actor"] == "dr-a" and e["org"] == "org-2" for e in feed)
    assert feed[1]["consents"] == ["c-1"]
    assert run(net, "verify").returncode == 0


def test_break_glass_is_logged_and_reviewed(net: Path) -> None:
    js(
        net,
        "practitioner",
        "add",
        "--org",
        "org-3",
        "--role",
        "emergency-clinician",
        "--id",
        "er-1",
    )
    js(net, "practitioner", "add", "--org", "org-3", "--role", "privacy-officer", "--id", "po-1")
    patient = js(net, "patient", "add", "--org", "org-1")["patient"]
    args = (
        "access",
        "check",
        "--actor",
        "er-1",
        "--patient",
        patient,
        "--purpose",
        "ETREAT",
        "--type",
        "AllergyIntolerance",
        "--break-glass",
    )
    assert js(net, *args)["permit"] is False  # no declaration yet
    bg = js(
        net,
        "breakglass",
        "declare",
        "--actor",
        "er-1",
        "--patient",
        patient,
        "--reason",
        "unconscious on arrival",
        "--type",
        "AllergyIntolerance",
    )
    decision = js(net, *args)
    assert decision["permit"] is True and decision["break_glass"] is True
    assert decision["rule"] == "break-glass"
    feed = js(net, "audit", "--patient", patient)
    assert [e["break_glass"] for e in feed["entries"]] == [False, True]
    # the organisation's open declarations, with the emergency read made under it
    pending = js(net, "breakglass", "reviews", "--org", "org-3")
    assert [(d["id"], d["actor"], d["status"]) for d in pending] == [(bg["id"], "er-1", "open")]
    assert [r["outcome"] for r in pending[0]["reads"]] == ["permit"]
    assert js(net, "breakglass", "reviews", "--org", "org-1") == []
    listing = " ".join(run(net, "breakglass", "reviews", "--org", "org-3").stdout.split())
    assert bg["id"] in listing and "1 read(s)" in listing and "unconscious on arrival" in listing
    js(net, "breakglass", "review", bg["id"], "--as", "po-1", "--outcome", "justified")
    assert js(net, "breakglass", "reviews", "--org", "org-3") == []
    done = js(net, "breakglass", "reviews", "--org", "org-3", "--status", "closed")
    assert [(d["outcome"], d["reviewer"]) for d in done] == [("justified", "po-1")]
    # a second review of the same declaration is refused with one clear line
    again = run(
        net, "breakglass", "review", bg["id"], "--as", "po-1", "--outcome", "justified", ok=False
    )
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_membership_needs_a_majority(net: Path) -> None:
    prop = js(net, "org", "propose", "add", "--org", "org-4", "--as", "org-1", "--name", "Lab")
    status = js(net, "org", "approve", prop["proposal"], "--as", "org-2")
    assert status["status"] == "applied"
    assert sorted(status["approvals"]) == ["org-1", "org-2"]


def test_bad_input_is_one_line_and_changes_nothing(net: Path) -> None:
    before = js(net, "verify")
    bad = run(net, "consent", "grant", "--patient", "pat-nobody", "--to-org", "org-2", ok=False)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    forged = run(
        net,
        "access",
        "check",
        "--actor",
        "nobody",
        "--patient",
        "pat-x",
        "--purpose",
        "TREAT",
        "--type",
        "Observation",
        ok=False,
    )
    assert forged.returncode != 0 and "Traceback" not in forged.stderr
    after = js(net, "verify")
    assert after["log_size"] == before["log_size"] and after["ok"]
