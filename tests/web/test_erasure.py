"""The patient's erasure request from the portal: crypto-shredding, after which the
records cannot be read and the ledger still verifies."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, expect

from .conftest import ConsoleErrors, ServerThread
from .network import Network, demo_token

pytestmark = pytest.mark.timeout(300)


async def test_patient_erases_their_records(
    browser: Browser, server: ServerThread, net: Network, artifacts: Path
) -> None:
    page = await browser.new_page()
    errors = ConsoleErrors(page)
    await page.goto(f"{server.url}/#/signin")
    await page.locator(f"input[name=identity][value='{net.patient}']").check()
    await page.locator("#demo-sign-in").click()
    timeline = page.get_by_test_id("timeline")
    await expect(timeline.locator("li.item").first).to_be_visible()
    await page.get_by_role("link", name="Privacy").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Privacy and erasure")
    await page.locator("#erase-submit").click()  # not confirmed: refused in the page
    await expect(page.locator("#alert")).to_contain_text("Tick the box")
    await page.get_by_label("I understand that my records will be permanently unreadable.").check()
    await page.locator("#erase-submit").click()
    await expect(page.locator(".notice.ok")).to_contain_text("erased", timeout=60000)
    await page.screenshot(path=str(artifacts / "patient-erased.png"), full_page=True)

    # nothing can be read any more; the ledger still verifies
    token = demo_token(server.url, net.patient)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        r = await client.get(
            f"/fhir/Patient/{net.patient}/$everything",
            headers={"Authorization": f"Bearer {token}"},
        )
        staff = demo_token(server.url, "system:hospital")
        verified = await client.get(
            "/api/ledger/verify", headers={"Authorization": f"Bearer {staff}"}
        )
    remaining = (
        [
            e["resource"]["resourceType"]
            for e in r.json().get("entry", [])
            if e["resource"]["resourceType"] != "OperationOutcome"
        ]
        if r.status_code == 200
        else []
    )
    assert remaining == [], remaining
    report = verified.json()
    assert report["ok"], report
    assert not errors.errors, errors.errors
