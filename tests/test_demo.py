"""``medledger demo``: the scenario runs end to end, every step checks what it shows.

The real command runs once as a subprocess (``--no-serve --json --dir``) on the
data shipped in the package; its network is then verified with ``medledger
verify`` and served with the demo's portal server. A second, in-process run
breaks two checks on purpose (a proof verifier that rejects everything, a
tamperer who forgets to write) and must report exactly those steps as failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import medledger.client
from medledger import demo
from medledger.errors import ProofError

BIN = Path(sys.executable).with_name("medledger")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["COLUMNS"] = "100"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    """``medledger demo --no-serve --json --dir DIR``: (DIR, summary, wall-clock seconds)."""
    root = tmp_path_factory.mktemp("demo") / "run"
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN), "demo", "--no-serve", "--json", "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
        check=False,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return root, json.loads(proc.stdout), seconds


def test_every_step_passes(demo_run: tuple[Path, dict[str, Any], float]) -> None:
    root, summary, seconds = demo_run
    steps = summary["steps"]
    assert [s["name"] for s in steps] == list(demo.STEP_NAMES)
    failed = [s for s in steps if not s["ok"]]
    assert not failed, failed
    assert summary["ok"] is True
    for name in (
        "consent-given",
        "cross-org-read",
        "read-denied",
        "consent-revoked",
        "break-glass",
        "duplicate-caught",
        "tamper-caught",
        "audit-proved",
    ):
        assert name in demo.STEP_NAMES
    assert all(s["detail"] for s in steps)
    # three custodians hold the imported data; the scenario patient's labs are at the lab
    assert {p["name"] for p in summary["patients"]} == {
        "Tom Goodwin",
        "Jordan Cruickshank",
        "Antonio Carmona",
    }
    held: dict[str, int] = {}
    for p in summary["patients"]:
        for org, n in p["resources"].items():
            held[org] = held.get(org, 0) + n
    assert set(held) == {"hospital", "clinic", "lab"}
    assert summary["imported"] == sum(held.values()) - 1  # + the lab's new HbA1c result
    assert summary["data_dir"] == str(root)
    print(f"demo --no-serve --json took {seconds:.1f} s (the scenario {summary['seconds']} s)")


def test_demo_ledger_verifies_with_the_cli(demo_run: tuple[Path, dict[str, Any], float]) -> None:
    root, _, _ = demo_run
    proc = subprocess.run(
        [str(BIN), "verify", "--json", "--data-dir", str(root / "node")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["transactions"] > 500


@pytest.fixture
def served(demo_run: tuple[Path, dict[str, Any], float]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The portal of the demo's network, served by the demo's own server, on a free port."""
    root, summary, _ = demo_run
    port = _free_port()
    server = demo.portal_server(root / "node", port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the portal server exited during startup"
        assert time.monotonic() < deadline, "the portal server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", summary
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_portal_serves_the_demo_identities(served: tuple[str, dict[str, Any]]) -> None:
    base, summary = served
    with httpx.Client(base_url=base, timeout=60) as http:
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        idents = {i["id"]: i for i in http.get("/api/demo/identities").json()}
        for pid, org, _ in demo.PRACTITIONERS:
            assert idents[pid]["org"] == org
        tom = summary["patients"][0]
        assert tom["name"] == "Tom Goodwin" and idents[tom["id"]]["kind"] == "patient"
        # the patient signs in and sees his records from both custodians
        login = http.post("/api/demo/login", json={"identity": tom["id"]})
        assert login.status_code == 200, login.text
        auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
        bundle = http.get(f"/fhir/Patient/{tom['id']}/$everything", headers=auth).json()
        found = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] != "OperationOutcome"
        ]
        assert len(found) == sum(tom["resources"].values())
        # Dr Grey's consent was revoked in the scenario: the hospital physician is denied
        login = http.post("/api/demo/login", json={"identity": "dr-grey"})
        auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
        denied = http.get(f"/fhir/Patient/{tom['id']}/$everything", headers=auth)
        assert denied.status_code == 403


def test_failing_checks_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A verifier that rejects every proof and a tamperer who writes nothing: two failures."""

    def reject(*args: Any, **kwargs: Any) -> None:
        raise ProofError("root mismatch (injected)")

    def forget(db: Path, tx_id: bytes) -> int:
        return -1  # the copy stays intact: verify passes, which the step must not accept

    monkeypatch.setattr(medledger.client, "verify_inclusion", reject)  # the patient's client
    monkeypatch.setattr(demo, "_erase_break_glass", forget)
    code = demo.main(tmp_path / "run", serve=False, json_output=True)
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    assert summary["ok"] is False
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(demo.STEP_NAMES)
    failed = sorted(name for name, s in steps.items() if not s["ok"])
    assert failed == ["audit-proved", "tamper-caught"], summary["steps"]
    assert "injected" in steps["audit-proved"]["detail"]
    assert "did not notice" in steps["tamper-caught"]["detail"]


def test_critical_failure_skips_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(name: str) -> dict[str, Any]:
        raise OSError(f"cannot read {name}")

    monkeypatch.setattr(demo, "load_bundle", broken)
    code = demo.main(tmp_path / "run", serve=False, json_output=True)
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(demo.STEP_NAMES)
    assert steps["network"]["ok"] and steps["practitioners"]["ok"]
    assert not steps["import"]["ok"] and "cannot read" in steps["import"]["detail"]
    for name in demo.STEP_NAMES[3:13]:
        assert not steps[name]["ok"] and "not run" in steps[name]["detail"], name
    assert steps["ledger-verified"]["ok"]  # the ledger itself is still sound
    assert not steps["tamper-caught"]["ok"]  # nothing to tamper with: no break-glass entry


def test_refuses_a_used_directory_and_a_busy_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    assert demo.main(used, serve=False) == 2
    assert "not empty" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert demo.main(tmp_path / "new", serve=True, port=port) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert not (tmp_path / "new" / "node").exists()


def test_split_sends_lab_results_to_the_laboratory() -> None:
    bundle = demo.load_bundle(demo.PATIENTS[0][0])
    home, lab = demo.split_bundle(bundle)
    assert len(home) + len(lab) == len(bundle["entry"])
    assert {e["resource"]["resourceType"] for e in lab} == {"Observation", "DiagnosticReport"}
    assert all(demo.is_lab_result(e["resource"]) for e in lab)
    assert not any(demo.is_lab_result(e["resource"]) for e in home)
    assert sum(e["resource"]["resourceType"] == "Patient" for e in home) == 1
    # references: in-bundle kept, imported mapped, dangling ones keep only their display
    encounter = next(e for e in home if e["resource"]["resourceType"] == "Encounter")
    local = {e["fullUrl"] for e in home}
    out = demo.resolve_references(encounter["resource"], {}, local, "clinic")
    assert out["subject"]["reference"] in local
    assert out["serviceProvider"]["reference"] == "Organization/clinic"
    for p in out.get("participant", []):
        assert "reference" not in p.get("individual", {})
    obs = next(e for e in lab if e["resource"].get("encounter"))
    mapped = demo.resolve_references(
        obs["resource"], {obs["resource"]["encounter"]["reference"]: "Encounter/e1"}, set(), "lab"
    )
    assert mapped["encounter"]["reference"] == "Encounter/e1"
