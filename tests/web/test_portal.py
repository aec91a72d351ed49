"""The portal driven in headless Chromium against the real app (uvicorn on a loopback port).

The scenario of issue 6: the patient grants consent to another organisation, a
clinician there sees the record (and is warned before repeating a lab test),
the patient revokes, the clinician is denied, an emergency clinician uses
break-glass, and the patient sees every one of those accesses in "who saw my
data", each marked verified by the browser's own proof checks, the break-glass
one highlighted. A tampered proof is not marked verified. Screenshots are
saved as artifacts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, Route, expect

from .conftest import ConsoleErrors, ServerThread, assert_no_junk
from .network import Network, demo_token

pytestmark = pytest.mark.timeout(300)

PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1200, "height": 900}


class User:
    """One person at one browser (own context: own sessionStorage)."""

    def __init__(self, context: BrowserContext, page: Page, base: str) -> None:
        self.context = context
        self.page = page
        self.base = base
        self.errors = ConsoleErrors(page)
        self.loads = 0

    async def sign_in(self, identity: str, query: str = "") -> None:
        page = self.page
        await page.goto(f"{self.base}/{query}#/signin")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
        await page.locator(f"input[name=identity][value='{identity}']").check()
        await page.locator("#demo-sign-in").click()
        await expect(page.get_by_test_id("signed-in-as")).to_be_visible()

    async def go(self, route: str) -> None:
        """Load the page afresh at ``route`` (a new document, as after a reload)."""
        self.loads += 1
        await self.page.goto(f"{self.base}/?load={self.loads}#{route}")

    async def shot(self, artifacts: Path, name: str) -> None:
        await assert_no_junk(self.page)
        await self.page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


@pytest.fixture
async def people(browser: Browser, server: ServerThread) -> AsyncIterator[dict[str, User]]:
    users = {}
    for name in ("patient", "grey", "ross"):
        ctx = await browser.new_context(viewport=DESKTOP)
        users[name] = User(ctx, await ctx.new_page(), server.url)
    try:
        yield users
    finally:
        for u in users.values():
            await u.context.close()


async def _record_page(user: User, patient: str) -> None:
    await user.go(f"/clinician/patient/{patient}")
    await expect(user.page.get_by_role("heading", level=1)).to_have_text("Patient record")
    await expect(user.page.get_by_text("Loading…")).to_have_count(0, timeout=30000)


async def test_consent_break_glass_and_verified_audit(
    net: Network, people: dict[str, User], artifacts: Path
) -> None:
    patient, grey, ross = people["patient"], people["grey"], people["ross"]
    pid = net.patient

    # -- the patient sees their records from the hospital and the lab
    await patient.sign_in(pid)
    page = patient.page
    await expect(page.get_by_role("heading", level=1)).to_have_text("My health record")
    timeline = page.get_by_test_id("timeline")
    await expect(timeline.locator("li.item").first).to_be_visible()
    assert await timeline.locator("li[data-type=Observation]").count() >= 10
    # each record names the organisation that holds it: encounters at the hospital, labs at the lab
    await expect(page.get_by_text("records from 2 organisations")).to_be_visible()
    lab = timeline.locator("li[data-type=DiagnosticReport]")
    await expect(lab).to_contain_text("Northside Laboratory")
    await expect(timeline.locator("li[data-type=Encounter]").first).to_contain_text(
        "St Mary's Hospital"
    )
    await patient.shot(artifacts, "patient-timeline")

    # -- a clinician at the clinic is denied before any consent
    await grey.sign_in("dr-grey")
    await _record_page(grey, pid)
    await expect(grey.page.get_by_test_id("access-denied")).to_be_visible()

    # -- the patient grants the clinic access
    await patient.go("/patient/consent")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sharing my records")
    await page.get_by_label("Organisation", exact=True).select_option("clinic")
    await page.locator("#grant-submit").click()
    consents = page.get_by_test_id("consent-list")
    await expect(consents.locator("li[data-status=active]")).to_have_count(1)
    await expect(page.locator(".notice.ok")).to_contain_text("Access granted to Riverside Clinic")
    await patient.shot(artifacts, "patient-consent")

    # -- the clinician now sees the record across organisations, and the duplicate warning
    await _record_page(grey, pid)
    gpage = grey.page
    await expect(gpage.get_by_test_id("access-denied")).to_have_count(0)
    await expect(gpage.get_by_test_id("timeline").locator("li.item").first).to_be_visible()
    assert await gpage.get_by_test_id("timeline").locator("li[data-type=Observation]").count() >= 10
    await expect(gpage.get_by_text("records from 2 organisations")).to_be_visible()
    await gpage.get_by_label("Lab test (LOINC code)").fill("718-7")
    await gpage.locator("#dup-check").click()
    warning = gpage.locator("[data-duplicate=true]")
    await expect(warning).to_be_visible()
    await expect(warning).to_contain_text("already done")
    await expect(warning).to_contain_text("at Northside Laboratory")
    await grey.shot(artifacts, "clinician-timeline")

    # -- the patient revokes; the clinician is denied again
    await page.locator("button[data-action=revoke]").click()
    await page.locator("button[data-action=confirm-revoke]").click()
    await expect(consents.locator("li[data-status=active]")).to_have_count(0)
    await _record_page(grey, pid)
    await expect(gpage.get_by_test_id("access-denied")).to_be_visible()
    await grey.shot(artifacts, "clinician-denied")

    # -- an emergency clinician breaks the glass, with a reason
    await ross.sign_in("dr-ross")
    await _record_page(ross, pid)
    rpage = ross.page
    await expect(rpage.get_by_test_id("access-denied")).to_be_visible()
    await rpage.locator("#break-glass-submit").click()  # no reason: refused in the page
    await expect(rpage.locator("#alert")).to_contain_text("reason")
    await rpage.get_by_label("Reason for emergency access").fill(
        "Unconscious on arrival at the emergency department; need lab history."
    )
    await rpage.get_by_label("I confirm this is an emergency").check()
    await rpage.locator("#break-glass-submit").click()
    await expect(rpage.get_by_text("Emergency access is active")).to_be_visible(timeout=30000)
    await expect(rpage.get_by_test_id("timeline").locator("li.item").first).to_be_visible()
    await ross.shot(artifacts, "clinician-break-glass")

    # -- the patient sees every access, verified in the browser, break-glass highlighted
    await patient.go("/patient/audit")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Who saw my data")
    items = page.get_by_test_id("audit-list").locator("li[data-self=false]")
    await expect(page.locator("li[data-verified]")).not_to_have_count(0, timeout=30000)
    await expect(page.locator("[data-verify=pending]")).to_have_count(0, timeout=60000)
    grey_items = items.filter(has=page.locator("text=dr-grey"))
    assert await grey_items.locator(".item-title").count() >= 3  # denied, permitted, denied
    permitted = page.locator("li[data-who=dr-grey][data-outcome=permitted]")
    denied = page.locator("li[data-who=dr-grey][data-outcome=denied]")
    assert await permitted.count() >= 1
    assert await denied.count() >= 2
    for loc in (permitted, denied):
        for i in range(await loc.count()):
            await expect(loc.nth(i)).to_have_attribute("data-verified", "true")
            await expect(loc.nth(i).locator("[data-verify=verified]")).to_have_text("✓ Verified")
    glass = page.locator("li[data-who=dr-ross][data-break-glass=true]")
    await expect(glass.first).to_be_visible()
    await expect(glass.first).to_have_class("item permitted break-glass")
    await expect(glass.first).to_have_attribute("data-verified", "true")
    await expect(glass.first.get_by_text("Emergency access (break-glass)")).to_be_visible()
    await expect(page.get_by_test_id("audit-summary")).to_contain_text("emergency (break-glass)")
    # ... with the review its declaration awaits, and the reason the clinician gave
    review = glass.first.get_by_test_id("review-status")
    await expect(review).to_contain_text("Awaiting review")
    await expect(review).to_contain_text("Unconscious on arrival at the emergency department")
    await patient.shot(artifacts, "patient-who-saw-my-data")

    # -- a tampered proof is NOT marked verified
    target = await permitted.first.get_attribute("data-audit-id")
    assert target

    async def tamper(route: Route) -> None:
        response = await route.fetch()
        doc = await response.json()
        h = bytearray(bytes.fromhex(doc["proof"][0]))
        h[0] ^= 0x01
        doc["proof"][0] = h.hex()
        await route.fulfill(response=response, json=doc)

    await page.route(f"**/api/ledger/tx/{target}/proof", tamper)
    await page.reload()
    await expect(page.locator("[data-verify=pending]")).to_have_count(0, timeout=60000)
    tampered = page.locator(f"li[data-audit-id='{target}']")
    await expect(tampered).to_have_attribute("data-verified", "false")
    await expect(tampered.locator("[data-verify=unverified]")).to_be_visible()
    await expect(tampered).to_contain_text("Not verified")
    others = page.locator(f"li[data-self=false]:not([data-audit-id='{target}'])")
    for i in range(await others.count()):
        await expect(others.nth(i)).to_have_attribute("data-verified", "true")
    await patient.shot(artifacts, "patient-tampered-proof")
    await page.unroute(f"**/api/ledger/tx/{target}/proof")

    # -- the clinic's privacy officer reviews the emergency access; the patient sees the verdict
    officer = {"Authorization": f"Bearer {demo_token(patient.base, 'po-clinic')}"}
    async with httpx.AsyncClient(base_url=patient.base, headers=officer, timeout=60) as http:
        open_ = (await http.get("/api/break-glass/reviews", params={"status": "open"})).json()
        mine = [d for d in open_ if d["patient"] == pid and d["actor"] == "dr-ross"]
        assert len(mine) == 1 and mine[0]["reads"], open_
        verdict = {"outcome": "justified", "note": "Confirmed with the emergency department."}
        done = await http.post(f"/api/break-glass/reviews/{mine[0]['id']}", json=verdict)
        assert done.status_code == 200, done.text
    await page.reload()
    review = page.locator("li[data-who=dr-ross][data-break-glass=true]").first
    await expect(review.get_by_test_id("review-status")).to_contain_text("Reviewed: justified")
    await expect(review.get_by_test_id("review-status")).to_contain_text(
        "Riverside Clinic's privacy officer"
    )

    for u in people.values():
        assert not u.errors.errors, u.errors.errors


async def test_partial_consent_shows_what_is_withheld(
    net: Network, people: dict[str, User], artifacts: Path
) -> None:
    patient, grey = people["patient"], people["grey"]
    await patient.sign_in(net.patient)
    await patient.go("/patient/consent")
    page = patient.page
    await page.get_by_label("Organisation", exact=True).select_option("clinic")
    await page.locator("input[name=types][value=Observation]").check()
    await page.locator("#grant-submit").click()
    active = page.get_by_test_id("consent-list").locator("li[data-status=active]")
    await expect(active).to_have_count(1)
    await expect(active).to_contain_text("Observation")

    await grey.sign_in("dr-grey")
    await _record_page(grey, net.patient)
    gpage = grey.page
    timeline = gpage.get_by_test_id("timeline")
    await expect(timeline.locator("li.item").first).to_be_visible()
    types = set(
        await timeline.locator("li.item").evaluate_all("els => els.map(e => e.dataset.type)")
    )
    assert types == {"Observation"}, types
    withheld = gpage.get_by_test_id("withheld")
    await expect(withheld).to_be_visible()
    for hidden in ("Condition", "Encounter", "Immunization", "DiagnosticReport"):
        await expect(withheld).to_contain_text(hidden)
    await grey.shot(artifacts, "clinician-withheld")

    await page.locator("button[data-action=revoke]").click()
    await page.locator("button[data-action=confirm-revoke]").click()
    await expect(active).to_have_count(0)
