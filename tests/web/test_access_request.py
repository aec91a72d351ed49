"""A refused clinician asks the patient for access; the patient grants it to that
clinician alone from the portal; the clinician can then read (and a colleague still cannot)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from .conftest import ConsoleErrors, ServerThread
from .network import Network

pytestmark = pytest.mark.timeout(300)


async def _sign_in(page: Page, base: str, identity: str) -> None:
    await page.goto(f"{base}/#/signin")
    await page.locator(f"input[name=identity][value='{identity}']").check()
    await page.locator("#demo-sign-in").click()
    await expect(page.get_by_test_id("signed-in-as")).to_be_visible()


async def _open_record(page: Page, base: str, patient: str, n: int) -> None:
    await page.goto(f"{base}/?n={n}#/clinician/patient/{patient}")
    await expect(page.locator("main[aria-busy]")).to_have_count(0, timeout=30000)


async def test_request_access_then_patient_grants_to_that_clinician(
    browser: Browser, server: ServerThread, net: Network, artifacts: Path
) -> None:
    grey_ctx = await browser.new_context()
    grey = await grey_ctx.new_page()
    errors = ConsoleErrors(grey)
    await _sign_in(grey, server.url, "dr-grey")
    await _open_record(grey, server.url, net.patient, 1)
    await expect(grey.get_by_test_id("access-denied")).to_be_visible()
    # a physician is not offered break-glass
    await expect(grey.get_by_test_id("no-break-glass")).to_be_visible()
    await grey.get_by_label("Message to the patient").fill("Follow-up of your blood count.")
    await grey.locator("#request-access-submit").click()
    await expect(grey.get_by_text("Request sent")).to_be_visible()

    patient_ctx = await browser.new_context()
    patient = await patient_ctx.new_page()
    errors_p = ConsoleErrors(patient)
    await _sign_in(patient, server.url, net.patient)
    await patient.get_by_role("link", name="Sharing").click()
    requests = patient.get_by_test_id("access-requests")
    await expect(requests.locator("li")).to_have_count(1)
    await expect(requests).to_contain_text("dr-grey at Riverside Clinic asks to see your records")
    await expect(requests).to_contain_text("Follow-up of your blood count.")
    await patient.screenshot(path=str(artifacts / "patient-access-request.png"), full_page=True)
    await requests.locator("button[data-action=grant-practitioner]").click()
    await expect(requests.locator("li")).to_have_count(0)
    active = patient.get_by_test_id("consent-list").locator("li[data-status=active]")
    await expect(active).to_have_count(1)
    await expect(active).to_contain_text("practitioner dr-grey")

    await _open_record(grey, server.url, net.patient, 2)
    await expect(grey.get_by_test_id("access-denied")).to_have_count(0)
    await expect(grey.get_by_test_id("timeline").locator("li.item").first).to_be_visible()

    # the consent names dr-grey only: a colleague at the same clinic is still refused
    ross_ctx = await browser.new_context()
    ross = await ross_ctx.new_page()
    await _sign_in(ross, server.url, "dr-ross")
    await _open_record(ross, server.url, net.patient, 3)
    await expect(ross.get_by_test_id("access-denied")).to_be_visible()
    await expect(ross.get_by_test_id("request-access")).to_be_visible()
    for ctx in (grey_ctx, patient_ctx, ross_ctx):
        await ctx.close()
    assert not errors.errors and not errors_p.errors, errors.errors + errors_p.errors


async def test_consent_to_everyone_with_a_role(
    browser: Browser, server: ServerThread, net: Network
) -> None:
    ctx = await browser.new_context()
    patient = await ctx.new_page()
    await _sign_in(patient, server.url, net.patient)
    await patient.get_by_role("link", name="Sharing").click()
    await patient.get_by_label("Everyone with a role").check()
    await expect(patient.get_by_label("Organisation", exact=True)).to_be_hidden()
    await patient.get_by_label("Role", exact=True).select_option("emergency-clinician")
    await patient.locator("#grant-submit").click()
    active = patient.get_by_test_id("consent-list").locator("li[data-status=active]")
    await expect(active.filter(has_text="every emergency-clinician")).to_have_count(1)

    ross_ctx = await browser.new_context()
    ross = await ross_ctx.new_page()
    await _sign_in(ross, server.url, "dr-ross")  # an emergency clinician at the clinic
    await _open_record(ross, server.url, net.patient, 1)
    await expect(ross.get_by_test_id("access-denied")).to_have_count(0)
    await expect(ross.get_by_test_id("timeline").locator("li.item").first).to_be_visible()

    # take it back (leaves the module's network as it was)
    item = active.filter(has_text="every emergency-clinician")
    await item.locator("button[data-action=revoke]").click()
    await item.locator("button[data-action=confirm-revoke]").click()
    await expect(active.filter(has_text="every emergency-clinician")).to_have_count(0)
    await ctx.close()
    await ross_ctx.close()
