// Clinician views: find a patient, see their records from every organisation (only
// what consent permits, with a notice of what is withheld), emergency access
// (break-glass) with a required reason, and a duplicate-test check before ordering.

import { ApiError, fhirGet, fhirSearchAll, fillCustodians, mayHaveRole, orgName, request } from "./api.js";
import { PURPOSE_LABELS } from "./audit.js";
import { codingText, custodianOf, dateOf, humanName, valueText } from "./fhir.js";
import { renderTimeline, withheldNotice } from "./timeline.js";
import { add, announce, choice, clearError, field, h, meta, notice, replace, setFieldError, showError, timeEl } from "./ui.js";

const PATIENT_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
/** An identifier your organisation gave the patient (an MRN), as value or system|value. */
const IDENTIFIER_RE = /^[A-Za-z0-9._:\/#|-]{1,200}$/;
const LOINC = "http://loinc.org";
const COMMON_TESTS = [
  ["4548-4", "Hemoglobin A1c"],
  ["2339-0", "Glucose"],
  ["2093-3", "Cholesterol, total"],
  ["2571-8", "Triglycerides"],
  ["18262-6", "LDL cholesterol"],
  ["2085-9", "HDL cholesterol"],
  ["718-7", "Hemoglobin"],
  ["6690-2", "Leukocytes"],
  ["777-3", "Platelets"],
  ["2160-0", "Creatinine"],
  ["33914-3", "eGFR"],
  ["6299-2", "Urea nitrogen"],
  ["2951-2", "Sodium"],
  ["6298-4", "Potassium"],
];

function patientLink(id) {
  return `#/clinician/patient/${encodeURIComponent(id)}`;
}

export async function clinicianSearch(root) {
  root.append(h("h1", {}, "Find a patient"),
    h("p", { class: "muted" }, "Patients are known on the network by a pseudonymous id, which they can give you from their portal; your own organisation's patients you can also find by the identifier you gave them, such as a medical record number. Opening a record is an access decision: it is permitted only as the patient's consent allows, and it is recorded on the ledger either way."));
  const form = h("form", { class: "card", role: "search", "aria-label": "Find a patient" });
  const idField = field({ label: "Patient id or identifier", name: "patient-id", hint: "A patient id such as pat-0123abcd…, or your organisation's identifier for the patient (an MRN; system|value to name its system)", attrs: { autocomplete: "off", spellcheck: "false", autocapitalize: "off" } });
  const submit = h("button", { type: "submit", id: "patient-search" }, "Search");
  form.append(idField.wrap, h("div", { class: "actions" }, submit));
  const results = h("div", { "aria-live": "polite", "data-testid": "search-results" });
  root.append(form, results);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const id = idField.input.value.trim().replace(/^Patient\//, "");
    const byId = id.startsWith("pat-") && PATIENT_ID_RE.test(id);
    if (!byId && !IDENTIFIER_RE.test(id)) {
      setFieldError(idField.input, idField.errId, "Enter a patient id or an identifier (letters, digits and . - _ : / | #).");
      idField.input.focus();
      return;
    }
    setFieldError(idField.input, idField.errId, "");
    submit.disabled = true;
    replace(results, h("p", { class: "muted" }, "Searching…"));
    try {
      const bundle = await fhirGet(`/fhir/Patient?${byId ? "_id" : "identifier"}=${encodeURIComponent(id)}`);
      const patients = (bundle.entry || []).map((e) => e.resource).filter((r) => r && r.resourceType === "Patient");
      await fillCustodians(patients);
      const withheld = withheldNotice(bundle);
      if (!patients.length && !byId) {
        replace(results, withheld || notice("", "No patient of your organisation has that identifier."));
        return;
      }
      if (!patients.length) {
        replace(results, withheld || notice("", "No patient with that id that you may see."),
          h("p", {}, h("a", { href: patientLink(id) }, "Open the record page anyway"), " (to request emergency access)."));
        return;
      }
      replace(results, h("ul", { class: "list" }, patients.map((p) => h("li", { class: "item" },
        h("div", { class: "item-head" },
          h("a", { class: "item-title", href: patientLink(p.id) }, humanName(p) || p.id)),
        meta([["Born", p.birthDate], ["Gender", p.gender], ["Id", h("code", {}, p.id)], ["Held by", orgName(custodianOf(p))]])))));
      announce(`${patients.length} patient found.`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 403 && !byId) {
        replace(results, notice("bad", h("strong", {}, "Access denied. "), e.message));
        announce("Access denied.");
      } else if (e instanceof ApiError && e.status === 403) {
        replace(results, notice("bad", h("strong", {}, "Access denied. "), e.message),
          h("p", {}, h("a", { href: patientLink(id) }, "Open the record page"), " to request emergency (break-glass) access if this is an emergency."));
        announce("Access denied.");
      } else if (e instanceof ApiError && e.status === 404) {
        replace(results, notice("", "No patient with that id."));
      } else {
        replace(results);
        showError(e.message);
      }
    } finally {
      submit.disabled = false;
    }
  });
}

// -- one patient --------------------------------------------------------------------------------

function emergencyHeaders() {
  return { "X-Purpose-Of-Use": "ETREAT", "X-Break-Glass": "true" };
}

async function loadRecord(pid, emergency) {
  const result = await fhirSearchAll(`/fhir/Patient/${encodeURIComponent(pid)}/$everything`, { headers: emergency ? emergencyHeaders() : undefined });
  await fillCustodians(result.entries.map((e) => e.resource));
  return result;
}

/** Whether the signed-in clinician may use break-glass (unknown roles: let the server decide). */
function mayBreakGlass() {
  return mayHaveRole("emergency-clinician");
}

function breakGlassForm(pid, onOpened, { open }) {
  if (!mayBreakGlass()) {
    return h("p", { class: "muted small", "data-testid": "no-break-glass" },
      "Emergency (break-glass) access is available to emergency clinicians only.");
  }
  const details = h("details", { class: "card", open, id: "break-glass" });
  const reason = field({ label: "Reason for emergency access", type: "textarea", name: "reason", required: true,
    hint: "Describe the emergency (no patient-identifying details). Your organisation's privacy officer will review this access.",
    attrs: { maxlength: "500", minlength: "10" } });
  const ack = choice({ name: "bg-ack", label: "I confirm this is an emergency and that this access will be reviewed." });
  const submit = h("button", { type: "submit", class: "danger", id: "break-glass-submit" }, "Open emergency access");
  const form = h("form", { novalidate: true }, reason.wrap, ack.wrap, h("div", { class: "actions" }, submit));
  details.append(h("summary", {}, h("strong", {}, "Emergency access (break-glass)")), form);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const text = reason.input.value.trim();
    if (text.length < 10) {
      setFieldError(reason.input, reason.errId, "A reason of at least 10 characters is required.");
      reason.input.focus();
      showError("Emergency access needs a reason.");
      return;
    }
    setFieldError(reason.input, reason.errId, "");
    if (!ack.input.checked) {
      showError("Confirm that this is an emergency.");
      ack.input.focus();
      return;
    }
    submit.disabled = true;
    try {
      await request("/api/break-glass", { method: "POST", body: { patient: pid, reason: text } });
      const result = await loadRecord(pid, true);
      details.open = false;
      await onOpened(result, text);
    } catch (e) {
      showError(`Emergency access failed: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });
  return details;
}

/** Ask the patient for access: a message the patient answers with a consent (or not). */
async function requestAccessCard(pid) {
  const card = h("section", { class: "card", "aria-labelledby": "req-title", "data-testid": "request-access" });
  const out = h("div", { "aria-live": "polite" });
  let mine = [];
  try {
    mine = (await request("/api/access-requests")).filter((r) => r.patient === pid);
  } catch {
    mine = [];
  }
  const last = mine[0];
  const purpose = field({ label: "Purpose", type: "select", name: "req-purpose",
    options: ["TREAT", "CAREMGT", "HOPERAT", "HRESCH"].map((p) => ({ value: p, label: `${PURPOSE_LABELS[p]} (${p})` })) });
  const note = field({ label: "Message to the patient", type: "textarea", name: "req-note", hint: "Optional. Say why you need access; no other patient details.", attrs: { maxlength: "500" } });
  const submit = h("button", { type: "submit", id: "request-access-submit" }, "Ask the patient for access");
  const form = h("form", {}, purpose.wrap, note.wrap, h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    submit.disabled = true;
    try {
      await request("/api/access-requests", { method: "POST", body: { patient: pid, purpose: purpose.input.value, note: note.input.value.trim() } });
      replace(out, notice("ok", "Request sent. The patient will see it in their portal and can grant access with a consent."));
      announce("Request sent.");
    } catch (e) {
      showError(`Could not send the request: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });
  add(card, h("h2", { id: "req-title" }, "Request access"),
    last ? h("p", { class: "small", "data-testid": "request-status" }, `You asked on `, timeEl(last.created), `: ${last.status === "pending" ? "waiting for the patient" : last.status}.`) : null,
    form, out);
  return card;
}

function duplicateCheck(pid, entries) {
  const section = h("section", { class: "card", "aria-labelledby": "dup-title" });
  const seen = new Map(COMMON_TESTS);
  for (const e of entries) {
    const r = e.resource;
    if (!r || r.resourceType !== "Observation") continue;
    for (const c of (r.code && r.code.coding) || []) {
      if (c.system === LOINC && c.code && !seen.has(c.code)) seen.set(c.code, c.display || codingText(r.code));
    }
  }
  const listId = "loinc-list";
  const codeField = field({ label: "Lab test (LOINC code)", name: "loinc", required: true, hint: "Pick a test or type its LOINC code, e.g. 4548-4 for HbA1c.", attrs: { list: listId, autocomplete: "off" } });
  const datalist = h("datalist", { id: listId }, [...seen.entries()].map(([code, display]) => h("option", { value: code }, display)));
  const submit = h("button", { type: "submit", id: "dup-check" }, "Check before ordering");
  const out = h("div", { "data-testid": "duplicate-result" });
  const form = h("form", { novalidate: true }, codeField.wrap, datalist, h("div", { class: "actions" }, submit));
  section.append(h("h2", { id: "dup-title" }, "Order a lab test"),
    h("p", { class: "muted small" }, "Before you order, medledger looks for a recent result of the same test from every organisation you may see."),
    form, out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const code = codeField.input.value.trim().split(/\s/)[0];
    if (!/^[0-9]{1,7}-[0-9]$/.test(code)) {
      setFieldError(codeField.input, codeField.errId, "Enter a LOINC code such as 4548-4.");
      codeField.input.focus();
      return;
    }
    setFieldError(codeField.input, codeField.errId, "");
    submit.disabled = true;
    replace(out, h("p", { class: "muted" }, "Checking…"));
    try {
      const bundle = await fhirGet(`/fhir/Observation/$duplicate-check?patient=${encodeURIComponent(pid)}&code=${encodeURIComponent(`${LOINC}|${code}`)}`);
      const found = (bundle.entry || []).map((e) => e.resource).filter((r) => r && r.resourceType === "Observation");
      await fillCustodians(found);
      const name = seen.get(code) || code;
      if (found.length) {
        const latest = found[0];
        replace(out, h("div", { class: "notice warn", role: "alert", "data-duplicate": "true" },
          h("strong", {}, `${name} was already done: `),
          `${valueText(latest) || "result available"} on `, timeEl(dateOf(latest)),
          custodianOf(latest) ? ` at ${orgName(custodianOf(latest))}` : "", ". Consider using this result instead of ordering the test again.",
          found.length > 1 ? h("ul", {}, found.slice(1, 6).map((r) => h("li", {}, valueText(r) || "result", " — ", timeEl(dateOf(r)), custodianOf(r) ? ` (${orgName(custodianOf(r))})` : ""))) : null));
      } else {
        replace(out, notice("ok", `No recent ${name} result found at any organisation whose records you may see. You can order the test.`),
          withheldNotice(bundle));
        announce("No duplicate found.");
      }
    } catch (e) {
      replace(out);
      showError(`Duplicate check failed: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });
  return section;
}

export async function clinicianPatient(root, pidEncoded) {
  const pid = decodeURIComponent(pidEncoded);
  root.append(h("h1", {}, "Patient record"), h("p", { class: "muted" }, "Patient id ", h("code", {}, pid)));
  const body = h("div", {});
  root.append(body);
  const status = h("p", { class: "muted", role: "status" }, "Loading…");
  body.append(status);

  async function show(result, emergencyReason) {
    replace(body);
    const patient = result.entries.map((e) => e.resource).find((r) => r && r.resourceType === "Patient");
    if (patient) {
      body.append(h("div", { class: "card" }, h("h2", {}, humanName(patient) || "Name withheld"),
        meta([["Born", patient.birthDate], ["Gender", patient.gender], ["Registered at", orgName(custodianOf(patient))]])));
    }
    if (emergencyReason) {
      body.append(notice("glass", h("strong", {}, "Emergency access is active. "),
        "You are reading under break-glass; this access is recorded on the ledger, shown to the patient and reviewed by your privacy officer."));
    }
    const withheld = withheldNotice(result.bundle);
    if (withheld) body.append(withheld);
    body.append(duplicateCheck(pid, result.entries));
    body.append(h("h2", {}, "Timeline across organisations"));
    const tl = h("div", {});
    body.append(tl);
    renderTimeline(tl, result.entries);
    if (!emergencyReason) body.append(breakGlassForm(pid, (r, why) => show(r, why), { open: false }));
    announce(`${result.entries.length} records loaded.`);
  }

  try {
    const result = await loadRecord(pid, false);
    await show(result, null);
  } catch (e) {
    if (e instanceof ApiError && e.status === 403) {
      replace(body,
        h("div", { class: "notice bad", "data-testid": "access-denied" }, h("strong", {}, "Access denied. "), e.message,
          h("p", { class: "small" }, "The patient's consent does not let you see these records. The refusal is recorded on the ledger.")),
        await requestAccessCard(pid),
        breakGlassForm(pid, (r, why) => show(r, why), { open: mayBreakGlass() }));
      announce("Access denied.");
      return;
    }
    if (e instanceof ApiError && e.status === 404) {
      replace(body, notice("", "There is no patient with this id."));
      return;
    }
    throw e;
  }
}
