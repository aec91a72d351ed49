// Patient views: my records from every organisation, and the erasure request.

import { fhirSearchAll, fillCustodians, getSession, request } from "./api.js";
import { renderTimeline, withheldNotice } from "./timeline.js";
import { announce, choice, clearError, h, notice, replace, showError } from "./ui.js";

export function myPatientId() {
  const s = getSession();
  return s && s.identity ? s.identity.subject : null;
}

export async function patientTimeline(root) {
  const pid = myPatientId();
  root.append(h("h1", {}, "My health record"),
    h("p", { class: "muted" }, "Everything the organisations in this network hold about you, newest first. Each record says which organisation holds it."),
    h("p", { class: "id-box small" }, "Your medledger id (give it to a clinician you want to share with): ",
      h("code", { "data-testid": "my-id" }, pid),
      navigator.clipboard ? h("button", { type: "button", class: "link", onclick: async () => {
        try {
          await navigator.clipboard.writeText(pid);
          announce("Your id was copied.");
        } catch {
          showError("Could not copy; select the id and copy it by hand.");
        }
      } }, "Copy") : null));
  const status = h("p", { class: "muted", role: "status" }, "Loading your records…");
  root.append(status);
  const { entries, more, bundle } = await fhirSearchAll(`/fhir/Patient/${encodeURIComponent(pid)}/$everything`);
  await fillCustodians(entries.map((e) => e.resource));
  status.remove();
  const withheld = withheldNotice(bundle);
  if (withheld) root.append(withheld);
  renderTimeline(root, entries);
  if (more) root.append(notice("", "Only the most recent records are shown."));
  announce(`${entries.length} records loaded.`);
}

export async function patientPrivacy(root) {
  const pid = myPatientId();
  root.append(h("h1", {}, "Privacy and erasure"),
    h("p", {}, "You can ask for your records to be erased. Each organisation destroys the keys that decrypt your records (crypto-shredding): the data can then never be read again by anyone, while the ledger keeps the proof that the records existed and who accessed them."),
    notice("warn", "Erasure cannot be undone. Your clinicians will no longer see these records."));
  const form = h("form", { class: "card", "aria-labelledby": "erase-title" });
  const ack = choice({ name: "erase-ack", label: "I understand that my records will be permanently unreadable." });
  const submit = h("button", { type: "submit", class: "danger", id: "erase-submit" }, "Request erasure of my records");
  const result = h("div", { "aria-live": "polite" });
  form.append(h("h2", { id: "erase-title" }, "Request erasure"), ack.wrap, h("div", { class: "actions" }, submit), result);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    if (!ack.input.checked) {
      showError("Tick the box to confirm you understand erasure is permanent.");
      ack.input.focus();
      return;
    }
    submit.disabled = true;
    try {
      const out = await request(`/fhir/Patient/${encodeURIComponent(pid)}/$erase`, { method: "POST", fhir: true, body: { resourceType: "Parameters" } });
      const text = out && out.issue ? out.issue.map((i) => i.diagnostics).filter(Boolean).join(" ") : "";
      replace(result, notice("ok", "Your erasure request was carried out. ", text));
      announce("Erasure done.");
    } catch (e) {
      showError(`Erasure failed: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });
  root.append(form);
}
