"""Usability of the portal: keyboard-only use, phone-sized screens, labelled controls,
focus on navigation, automatic logoff after inactivity, and the ledger explorer."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, expect

from .conftest import ConsoleErrors, ServerThread, assert_no_junk
from .network import Network, demo_token

pytestmark = pytest.mark.timeout(300)

PHONE = {"width": 375, "height": 740}

# Every visible form control has an accessible name (a <label for>, a wrapping label or aria-label).
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter((el) => el.offsetParent !== null && el.type !== 'hidden')
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 120))"""
# How far the page is wider than the phone's 375 CSS pixels (a mobile browser would zoom out).
OVERFLOW = "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) - 375"


async def _sign_in(page: Page, base: str, identity: str, query: str = "") -> None:
    await page.goto(f"{base}/{query}#/signin")
    await page.locator(f"input[name=identity][value='{identity}']").check()
    await page.locator("#demo-sign-in").click()
    await expect(page.get_by_test_id("signed-in-as")).to_be_visible()


async def _settled(page: Page) -> None:
    await expect(page.locator("main[aria-busy]")).to_have_count(0, timeout=30000)
    await expect(page.locator("main h1")).to_have_count(1)
    await expect(page.get_by_text("Loading", exact=False)).to_have_count(0, timeout=30000)
    await expect(page.locator("[data-verify=pending]")).to_have_count(0, timeout=60000)


async def test_keyboard_only_sign_in_and_navigation(
    browser: Browser, server: ServerThread, net: Network
) -> None:
    page = await browser.new_page()
    errors = ConsoleErrors(page)
    await page.goto(server.url + "/")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    # focus starts on the view heading; the first Tab goes to the skip link
    assert await page.evaluate("document.activeElement.tagName") == "H1"
    await page.keyboard.press("Tab")
    for _ in range(40):
        focused = await page.evaluate("[document.activeElement.name, document.activeElement.value]")
        if focused[0] == "identity":
            break
        await page.keyboard.press("Tab")
    else:
        pytest.fail("the identity picker cannot be reached with Tab")
    # arrow keys move within the radio group: go to dr-grey
    for _ in range(20):
        value = await page.evaluate("document.activeElement.value")
        if value == "dr-grey":
            break
        await page.keyboard.press("ArrowDown")
    assert await page.evaluate("document.activeElement.checked") is True
    await page.keyboard.press("Enter")  # submits the form
    await expect(page.get_by_role("heading", level=1)).to_have_text("Find a patient")
    assert await page.evaluate("document.activeElement.tagName") == "H1"
    # search with the keyboard only
    await page.keyboard.press("Tab")
    for _ in range(20):
        if await page.evaluate("document.activeElement.name") == "patient-id":
            break
        await page.keyboard.press("Tab")
    await page.keyboard.type("not valid!")
    await page.keyboard.press("Enter")
    field = page.locator("input[name=patient-id]")
    await expect(field).to_have_attribute("aria-invalid", "true")
    described = await field.get_attribute("aria-describedby")
    assert described and await page.locator(f"#{described.split()[-1]}").is_visible()
    await field.fill(net.patient)
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("search-results")).not_to_be_empty()
    assert not errors.errors, errors.errors


@pytest.mark.parametrize("who", ["patient", "dr-grey", "po-clinic"])
async def test_phone_layout_and_labels(
    browser: Browser, server: ServerThread, net: Network, artifacts: Path, who: str
) -> None:
    ctx = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = await ctx.new_page()
    errors = ConsoleErrors(page)
    identity = net.patient if who == "patient" else who
    await page.goto(server.url + "/#/signin")
    assert await page.evaluate(OVERFLOW) <= 0
    assert await page.evaluate(UNLABELLED) == []
    await _sign_in(page, server.url, identity)
    routes = {
        "patient": [
            "/patient/timeline",
            "/patient/audit",
            "/patient/consent",
            "/patient/privacy",
            "/explorer",
        ],
        "dr-grey": ["/clinician", f"/clinician/patient/{net.patient}", "/explorer"],
        "po-clinic": ["/clinician/reviews/all", "/explorer"],
    }[who]
    for i, route in enumerate(routes):
        await page.goto(f"{server.url}/?n={i}#{route}")
        await _settled(page)
        await assert_no_junk(page)
        assert await page.evaluate(OVERFLOW) <= 0, f"{route} scrolls sideways on a phone"
        assert await page.evaluate(UNLABELLED) == [], route
        assert await page.evaluate("document.activeElement.tagName") == "H1", route
        name = route.strip("/").replace("/", "-").replace(net.patient, "record")
        await page.screenshot(path=str(artifacts / f"phone-{who}-{name}.png"), full_page=True)
    await ctx.close()
    assert not errors.errors, errors.errors


async def test_automatic_logoff_after_inactivity(
    browser: Browser, server: ServerThread, net: Network
) -> None:
    page = await browser.new_page()
    # ?idle=N shortens (never lengthens) the server's 15-minute setting
    await _sign_in(page, server.url, net.patient, "?idle=6")
    await expect(page.get_by_role("heading", level=1)).to_have_text("My health record")
    warning = page.get_by_role("alertdialog")
    await expect(warning).to_be_visible(timeout=10000)
    await expect(page.locator("#idle-stay")).to_be_focused()
    await page.locator("#idle-stay").click()
    await expect(warning).to_be_hidden()
    await page.wait_for_timeout(2500)
    await expect(page.get_by_test_id("signed-in-as")).to_be_visible()  # activity reset the clock
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in", timeout=15000)
    await expect(page.get_by_text("signed out automatically")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    assert await page.get_by_test_id("timeline").count() == 0
    # going back to a patient page needs a new sign-in
    await page.goto(server.url + "/?again=1#/patient/timeline")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")


async def test_sign_out_forgets_the_token(
    browser: Browser, server: ServerThread, net: Network
) -> None:
    page = await browser.new_page()
    await _sign_in(page, server.url, "dr-grey")
    assert await page.evaluate("sessionStorage.getItem('medledger.session') !== null")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    assert await page.evaluate("sessionStorage.length") == 0
    assert await page.evaluate("localStorage.getItem('medledger.session')") is None


async def test_ledger_explorer(
    browser: Browser, server: ServerThread, net: Network, artifacts: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    errors = ConsoleErrors(page)
    # the checkpoint is public and checked in the browser
    await page.goto(server.url + "/#/explorer")
    await expect(page.get_by_test_id("checkpoint-verdict")).to_contain_text("Signatures verified")
    cosigs = page.get_by_test_id("cosignatures").locator("li")
    await expect(cosigs).to_have_count(3)
    await expect(cosigs.get_by_text("✓ valid")).to_have_count(3)
    await expect(page.get_by_text("Riverside Clinic").first).to_be_visible()
    await _sign_in(page, server.url, "system:hospital")
    await page.goto(server.url + "/?n=1#/explorer")
    await expect(page.get_by_test_id("consistency")).to_contain_text("Append-only")
    await page.locator("#run-verify").click()
    await expect(page.get_by_test_id("verify-result")).to_contain_text(
        "Ledger verified", timeout=60000
    )
    await page.screenshot(path=str(artifacts / "explorer.png"), full_page=True)
    # a block, then one of its transactions and its inclusion proof
    await page.get_by_label("Block height or transaction id").fill("1")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Block #1")
    await expect(page.get_by_text("✓ valid")).to_be_visible()
    await page.get_by_role("link", name="principal.register").first.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Transaction")
    await page.locator("#verify-inclusion").click()
    await expect(page.get_by_test_id("inclusion-result")).to_contain_text("Included")
    await page.screenshot(path=str(artifacts / "explorer-transaction.png"), full_page=True)
    # the newest blocks are listed; links lead to them
    await page.goto(server.url + "/?n=2#/explorer")
    await page.get_by_test_id("blocks").get_by_role("link").first.click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Block #")
    assert not errors.errors, errors.errors


async def test_privacy_officer_reviews_break_glass(
    browser: Browser, server: ServerThread, net: Network, artifacts: Path
) -> None:
    ross = demo_token(server.url, "dr-ross")
    async with httpx.AsyncClient(timeout=60) as http:
        declared = await http.post(
            server.url + "/api/break-glass",
            json={"patient": net.patient, "reason": "Found unresponsive at the bus stop."},
            headers={"Authorization": f"Bearer {ross}"},
        )
    assert declared.status_code == 201, declared.text
    bid = declared.json()["id"]
    page = await browser.new_page()
    errors = ConsoleErrors(page)
    # a physician has no review page in the menu
    await _sign_in(page, server.url, "dr-grey")
    await expect(page.get_by_role("link", name="Break-glass reviews")).to_have_count(0)
    await page.locator("#sign-out").click()
    await _sign_in(page, server.url, "po-clinic")
    await page.get_by_role("link", name="Break-glass reviews").click()
    await _settled(page)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Break-glass reviews")
    card = page.locator(f"[data-testid=review][data-id='{bid}']")
    await expect(card).to_contain_text("Found unresponsive at the bus stop.")
    await expect(card).to_contain_text("Awaiting review")
    await assert_no_junk(page)
    assert await page.evaluate(UNLABELLED) == []
    # no outcome chosen: refused in the page, nothing sent
    await card.get_by_role("button", name="Record the review").click()
    await expect(page.locator("#alert")).to_contain_text("Choose an outcome")
    await card.get_by_label("Justified: a genuine emergency").check()
    await card.get_by_label("Note for the record").fill("Checked with the ward: cardiac arrest.")
    await card.get_by_role("button", name="Record the review").click()
    # reviewed: it leaves the "awaiting" list and shows under "Reviewed" with the verdict
    await expect(page.locator(f"[data-testid=review][data-id='{bid}']")).to_have_count(0)
    await page.get_by_role("link", name="Reviewed").click()
    await _settled(page)
    done = page.locator(f"[data-testid=review][data-id='{bid}']")
    await expect(done).to_contain_text("Reviewed: justified")
    await expect(done).to_contain_text("po-clinic")
    await expect(done).to_contain_text("Checked with the ward: cardiac arrest.")
    await expect(done.get_by_role("button", name="Record the review")).to_have_count(0)
    await page.screenshot(path=str(artifacts / "break-glass-reviews.png"), full_page=True)
    assert not errors.errors, errors.errors


async def test_a_clinician_finds_their_organisations_patient_by_mrn(
    browser: Browser, server: ServerThread, net: Network
) -> None:
    mrn = "7322ed57-a337-4b4d-adcc-cc30db95203c"  # the hospital's MRN in tests/web/data
    page = await browser.new_page()
    errors = ConsoleErrors(page)
    await _sign_in(page, server.url, "dr-hale")  # a hospital physician
    await _settled(page)
    await page.get_by_label("Patient id or identifier").fill(
        f"http://hospital.smarthealthit.org|{mrn}"
    )
    await page.locator("#patient-search").click()
    results = page.get_by_test_id("search-results")
    await expect(results.locator(f"a[href='#/clinician/patient/{net.patient}']")).to_be_visible()
    await expect(results).to_contain_text("St Mary's Hospital")
    # the same MRN means nothing at the clinic
    await page.locator("#sign-out").click()
    await _sign_in(page, server.url, "dr-grey")
    await _settled(page)
    await page.get_by_label("Patient id or identifier").fill(mrn)
    await page.locator("#patient-search").click()
    await expect(results).to_contain_text("No patient of your organisation has that identifier")
    await expect(results.locator("a")).to_have_count(0)
    assert not errors.errors, errors.errors
