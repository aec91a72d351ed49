// Consent management: grant access (to an organisation, a practitioner or a role;
// resource types; purposes; period) as a FHIR Consent the node turns into a
// signed consent transaction, list consents and revoke them.

import { fhirSearchAll, orgName, request } from "./api.js";
import { codingText, RESOURCE_LABELS, SHAREABLE_TYPES } from "./fhir.js";
import { myPatientId } from "./patient.js";
import { MAIN_PURPOSES, PURPOSE_LABELS, purposeText } from "./audit.js";
import { actionButton, announce, badge, choice, clearError, field, h, meta, notice, replace, setFieldError, showError } from "./ui.js";

// Identifier systems of actors that are not one organisation or practitioner (see fhir/consent.py).
const ROLE_SYSTEM = "urn:medledger:role";
const ACTOR_SYSTEM = "urn:medledger:actor";
const DEFAULT_PURPOSES = ["TREAT", "ETREAT", "HOPERAT", "HPAYMT", "HRESCH"];
const DEFAULT_ROLES = ["physician", "nurse", "lab", "pharmacist", "emergency-clinician"];

/** Build a FHIR R4 Consent from the form's values. */
export function buildConsent({ patient, actorKind, actorId, types, purposes, start, end }) {
  const actor = { role: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", code: "IRCP", display: "information recipient" }] } };
  if (actorKind === "org") actor.reference = { reference: `Organization/${actorId}` };
  else if (actorKind === "practitioner") actor.reference = { reference: `Practitioner/${actorId}` };
  else if (actorKind === "referred") actor.reference = { identifier: { system: ACTOR_SYSTEM, value: "referred" } };
  else actor.reference = { identifier: { system: ROLE_SYSTEM, value: actorId }, display: `any ${actorId}` };
  const provision = {
    type: "permit",
    actor: [actor],
    action: [{ coding: [{ system: "http://terminology.hl7.org/CodeSystem/consentaction", code: "access" }] }],
  };
  if (purposes.length) provision.purpose = purposes.map((code) => ({ system: "http://terminology.hl7.org/CodeSystem/v3-ActReason", code }));
  if (types.length) provision.class = types.map((code) => ({ system: "http://hl7.org/fhir/resource-types", code }));
  if (start || end) {
    provision.period = {};
    if (start) provision.period.start = start;
    if (end) provision.period.end = end;
  }
  return {
    resourceType: "Consent",
    status: "active",
    scope: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/consentscope", code: "patient-privacy" }] },
    category: [{ coding: [{ system: "http://loinc.org", code: "59284-0", display: "Patient Consent" }] }],
    patient: { reference: `Patient/${patient}` },
    dateTime: new Date().toISOString(),
    policyRule: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/v3-ActCode", code: "OPTIN" }] },
    provision,
  };
}

function actorsOf(provision) {
  return (provision.actor || []).map((a) => {
    const r = a.reference || {};
    const [type, id] = (r.reference || "").split("/");
    if (type === "Organization") return orgName(id);
    if (type === "Practitioner") return `practitioner ${id}`;
    const ident = r.identifier || {};
    if (ident.system === ROLE_SYSTEM) return `every ${ident.value}`;
    if (ident.system === ACTOR_SYSTEM && ident.value === "referred") return "clinicians you are referred to";
    return r.display || codingText(a.role) || "anyone";
  });
}

function periodText(p) {
  if (!p || (!p.start && !p.end)) return "no end date";
  const f = (x) => (x ? new Date(x).toLocaleDateString() : "");
  if (p.start && p.end) return `${f(p.start)} to ${f(p.end)}`;
  return p.start ? `from ${f(p.start)}` : `until ${f(p.end)}`;
}

function consentItem(c, onRevoke) {
  const prov = c.provision || {};
  const active = c.status === "active";
  const types = (prov.class || []).map((x) => RESOURCE_LABELS[x.code] || x.code);
  const purposes = (prov.purpose || []).map((x) => x.code);
  const who = actorsOf(prov);
  const li = h("li", { class: "item", dataset: { consentId: c.id || "", status: c.status || "" } },
    h("div", { class: "item-head" },
      h("span", { class: "item-title" }, `${prov.type === "deny" ? "Deny" : "Share with"} ${who.join(", ") || "anyone"}`),
      badge(active ? "Active" : c.status === "inactive" ? "Revoked" : c.status || "unknown", active ? "ok" : "")),
    meta([
      ["Records", types.length ? types.join(", ") : "all types"],
      ["Purpose", purposes.length ? purposeText(purposes) : "any purpose"],
      ["Valid", periodText(prov.period)],
      ["Consent id", h("code", {}, c.id || "")],
    ]));
  if (active) {
    const slot = h("div", { class: "actions" });
    const revoke = h("button", { type: "button", class: "secondary", "data-action": "revoke" }, "Revoke…");
    revoke.addEventListener("click", () => {
      const confirmBtn = actionButton("Yes, revoke access", () => onRevoke(c), { class: "danger", "data-action": "confirm-revoke" });
      const cancel = h("button", { type: "button", class: "secondary", onclick: () => { replace(slot, revoke); revoke.focus(); } }, "Cancel");
      replace(slot, h("span", {}, "Revoke this consent? Access stops immediately. "), confirmBtn, cancel);
      confirmBtn.focus();
    });
    slot.append(revoke);
    li.append(slot);
  }
  return li;
}

async function revokeConsent(c) {
  const path = `/fhir/Consent/${encodeURIComponent(c.id)}`;
  try {
    await request(path, { method: "DELETE", fhir: true });
  } catch (e) {
    if (e.status !== 405 && e.status !== 501) throw e;
    await request(path, { method: "PUT", fhir: true, body: { ...c, status: "inactive" } });
  }
}

export async function patientConsent(root) {
  const pid = myPatientId();
  root.append(h("h1", {}, "Sharing my records"),
    h("p", { class: "muted" }, "Choose who may see your records, which kinds and for what purpose. Each choice is signed and recorded on the ledger; you can take it back at any time."));

  let directory = { orgs: [], practitioners: [], roles: DEFAULT_ROLES, purposes: DEFAULT_PURPOSES };
  try {
    directory = await request("/api/ledger/directory");
  } catch (e) {
    showError(`Cannot load the directory of organisations: ${e.message}`);
  }

  // -- the grant form ----------------------------------------------------------
  const form = h("form", { class: "card", "aria-labelledby": "grant-title", novalidate: true });
  const kindChoices = [["org", "An organisation"], ["practitioner", "A practitioner"], ["role", "Everyone with a role"], ["referred", "Clinicians I am referred to"]]
    .map(([value, label], i) => choice({ type: "radio", name: "actor-kind", value, label, checked: i === 0 }));
  const orgField = field({ label: "Organisation", type: "select", name: "org",
    options: [{ value: "", label: "Choose an organisation" }, ...directory.orgs.filter((o) => o.status !== "removed").map((o) => ({ value: o.id, label: o.name || o.id }))] });
  const listId = "practitioner-list";
  const pracField = field({ label: "Practitioner id", name: "practitioner", hint: "As given by the clinician or their organisation.", attrs: { list: listId, autocomplete: "off" } });
  const datalist = h("datalist", { id: listId }, (directory.practitioners || []).filter((p) => p.kind === "practitioner")
    .map((p) => h("option", { value: p.id }, `${p.id} (${(p.roles || []).join(", ")} at ${orgName(p.org)})`)));
  const roleField = field({ label: "Role", type: "select", name: "role",
    options: [{ value: "", label: "Choose a role" }, ...(directory.roles || DEFAULT_ROLES).filter((r) => r !== "admin" && r !== "privacy-officer").map((r) => ({ value: r, label: r }))] });
  const targets = { org: orgField, practitioner: pracField, role: roleField, referred: null };
  function showTarget() {
    const k = kindChoices.find((c) => c.input.checked).input.value;
    for (const [name, f] of Object.entries(targets)) if (f) f.wrap.hidden = name !== k;
  }
  kindChoices.forEach((c) => c.input.addEventListener("change", showTarget));

  const typeChoices = SHAREABLE_TYPES.map((t) => choice({ name: "types", value: t, label: t === "Patient" ? "Demographics" : RESOURCE_LABELS[t] || t }));
  const known = directory.purposes && directory.purposes.length ? directory.purposes : DEFAULT_PURPOSES;
  const ordered = [...MAIN_PURPOSES.filter((p) => known.includes(p)), ...known.filter((p) => !MAIN_PURPOSES.includes(p))];
  const purposeChoices = ordered.map((p) => choice({ name: "purposes", value: p, label: PURPOSE_LABELS[p] ? `${PURPOSE_LABELS[p][0].toUpperCase()}${PURPOSE_LABELS[p].slice(1)} (${p})` : p, checked: p === "TREAT" }));
  const mainChoices = purposeChoices.filter((c) => MAIN_PURPOSES.includes(c.input.value));
  const otherChoices = purposeChoices.filter((c) => !MAIN_PURPOSES.includes(c.input.value));
  const startField = field({ label: "From", type: "date", name: "start", hint: "Optional: today if empty." });
  const endField = field({ label: "Until", type: "date", name: "end", hint: "Optional: no end date if empty." });
  const submit = h("button", { type: "submit", id: "grant-submit" }, "Grant access");

  form.append(
    h("h2", { id: "grant-title" }, "Grant access"),
    h("fieldset", {}, h("legend", {}, "Who"), h("div", { class: "choices" }, kindChoices.map((c) => c.wrap)),
      orgField.wrap, pracField.wrap, datalist, roleField.wrap),
    h("fieldset", {}, h("legend", {}, "Which records"), h("p", { class: "hint" }, "Leave all unticked to share every kind of record."),
      h("div", { class: "choices" }, typeChoices.map((c) => c.wrap))),
    h("fieldset", {}, h("legend", {}, "For what purpose"), h("p", { class: "hint" }, "Leave all unticked to allow any purpose."),
      h("div", { class: "choices" }, mainChoices.map((c) => c.wrap)),
      otherChoices.length ? h("details", {}, h("summary", {}, "Other purposes"), h("div", { class: "choices" }, otherChoices.map((c) => c.wrap))) : null),
    h("fieldset", {}, h("legend", {}, "For how long"), h("div", { class: "field-row" }, startField.wrap, endField.wrap)),
    h("div", { class: "actions" }, submit));
  showTarget();

  const listWrap = h("div", { "data-testid": "consent-list" });
  const result = h("div", { "aria-live": "polite" });

  const requestsWrap = h("div", { "data-testid": "access-requests" });

  async function answer(req, status, consentId) {
    await request(`/api/access-requests/${encodeURIComponent(req.id)}`, { method: "POST", body: { status, consent: consentId || null } });
  }

  async function loadRequests() {
    let reqs = [];
    try {
      reqs = (await request("/api/access-requests")).filter((r) => r.status === "pending");
    } catch {
      reqs = [];
    }
    if (!reqs.length) {
      replace(requestsWrap);
      return;
    }
    replace(requestsWrap, h("h2", { id: "requests-title", tabindex: "-1" }, "Requests waiting for you"),
      h("ul", { class: "list" }, reqs.map((r) => {
        const grant = async (actorKind, actorId, who) => {
          clearError();
          try {
            const consent = buildConsent({ patient: pid, actorKind, actorId, types: r.resource_types || [], purposes: [r.purpose], start: null, end: null });
            const created = await request("/fhir/Consent", { method: "POST", fhir: true, body: consent });
            await answer(r, "granted", created && created.id);
            announce(`Access granted to ${who}.`);
            replace(result, notice("ok", `Access granted to ${who}. The consent is signed and on the ledger.`));
            await Promise.all([loadRequests(), loadList()]);
          } catch (e) {
            showError(`Could not grant access: ${e.message}`);
          }
        };
        return h("li", { class: "item", dataset: { requestId: r.id } },
          h("div", { class: "item-head" }, h("span", { class: "item-title" }, `${r.practitioner} at ${orgName(r.org)} asks to see your records`)),
          meta([["Purpose", purposeText([r.purpose])], ["Records", (r.resource_types || []).length ? r.resource_types.join(", ") : "all types"], ["Asked", new Date(r.created).toLocaleString()]]),
          r.note ? h("blockquote", { class: "small" }, r.note) : null,
          h("div", { class: "actions" },
            actionButton(`Share with ${r.practitioner}`, () => grant("practitioner", r.practitioner, r.practitioner), { "data-action": "grant-practitioner" }),
            actionButton(`Share with ${orgName(r.org)}`, () => grant("org", r.org, orgName(r.org)), { class: "secondary", "data-action": "grant-org" }),
            actionButton("Decline", async () => {
              try {
                await answer(r, "declined");
                announce("Request declined.");
                await loadRequests();
              } catch (e) {
                showError(`Could not decline: ${e.message}`);
              }
            }, { class: "secondary", "data-action": "decline" })));
      })));
  }

  async function loadList() {
    const { entries } = await fhirSearchAll(`/fhir/Consent?patient=${encodeURIComponent(pid)}`);
    const consents = entries.map((e) => e.resource).filter((r) => r && r.resourceType === "Consent");
    consents.sort((a, b) => (a.status === b.status ? 0 : a.status === "active" ? -1 : 1));
    if (!consents.length) {
      replace(listWrap, h("p", { class: "muted" }, "You have not shared your records with anyone yet."));
      return;
    }
    replace(listWrap, h("ul", { class: "list" }, consents.map((c) => consentItem(c, async (consent) => {
      clearError();
      try {
        await revokeConsent(consent);
        announce("Consent revoked. Access has stopped.");
        await loadList();
        const heading = document.getElementById("consents-title");
        if (heading) heading.focus();
      } catch (e) {
        showError(`Could not revoke: ${e.message}`);
      }
    }))));
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const actorKind = kindChoices.find((c) => c.input.checked).input.value;
    const target = targets[actorKind];
    const actorId = target ? target.input.value.trim() : "referred";
    for (const f of Object.values(targets)) if (f) setFieldError(f.input, f.errId, "");
    setFieldError(endField.input, endField.errId, "");
    if (!actorId) {
      setFieldError(target.input, target.errId, "Choose who you are sharing with.");
      target.input.focus();
      showError("Choose who you are sharing with.");
      return;
    }
    const start = startField.input.value;
    const end = endField.input.value;
    if (start && end && end <= start) {
      setFieldError(endField.input, endField.errId, "The end date must be after the start date.");
      endField.input.focus();
      showError("The end date must be after the start date.");
      return;
    }
    const consent = buildConsent({
      patient: pid,
      actorKind,
      actorId,
      types: typeChoices.filter((c) => c.input.checked).map((c) => c.input.value),
      purposes: purposeChoices.filter((c) => c.input.checked).map((c) => c.input.value),
      start: start || null,
      end: end || null,
    });
    submit.disabled = true;
    try {
      await request("/fhir/Consent", { method: "POST", fhir: true, body: consent });
      const who = { org: orgName(actorId), role: `every ${actorId}`, referred: "clinicians you are referred to" }[actorKind] || actorId;
      announce(`Access granted to ${who}.`);
      replace(result, notice("ok", `Access granted to ${who}. The consent is signed and on the ledger.`));
      await loadList();
    } catch (e) {
      showError(`Could not grant access: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });

  root.append(requestsWrap, form, result, h("h2", { id: "consents-title", tabindex: "-1" }, "My consents"), listWrap);
  await Promise.all([loadList(), loadRequests()]);
}
