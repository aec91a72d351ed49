// Privacy officer: the organisation's break-glass declarations, the emergency reads
// made under each, and the mandatory review (justified or not, with a note), which
// goes on the ledger signed with the officer's own key.

import { ApiError, mayHaveRole, request } from "./api.js";
import { PURPOSE_LABELS } from "./audit.js";
import { announce, badge, choice, clearError, field, h, meta, notice, replace, setFieldError, showError, shortHash, timeEl } from "./ui.js";

const FILTERS = [
  ["open", "Awaiting review"],
  ["closed", "Reviewed"],
  ["all", "All"],
];

/** Whether the signed-in practitioner reviews break-glass (unknown roles: let the server decide). */
export function mayReview() {
  return mayHaveRole("privacy-officer");
}

export async function breakGlassReviews(root, filter = "open") {
  const status = FILTERS.some(([f]) => f === filter) ? filter : "open";
  root.append(h("h1", {}, "Break-glass reviews"),
    h("p", { class: "muted" }, "Every emergency (break-glass) access by a clinician of your organisation must be reviewed. Each declaration below lists the reads made under it, from the ledger's access log; your verdict is recorded on the ledger, signed with your own key."));
  root.append(h("nav", { class: "filters", "aria-label": "Which declarations" },
    h("ul", {}, FILTERS.map(([f, label]) => h("li", {},
      h("a", { href: `#/clinician/reviews/${f}`, "aria-current": f === status ? "page" : null }, label))))));
  const list = h("div", { "data-testid": "review-list", "aria-live": "polite" });
  root.append(list);
  let items;
  try {
    items = await request(`/api/break-glass/reviews?status=${status}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 403) {
      replace(list, notice("info", "Break-glass reviews are for your organisation's privacy officer."));
      return;
    }
    throw e;
  }
  if (!items.length) {
    replace(list, h("p", { class: "muted", "data-testid": "no-reviews" },
      status === "open" ? "No declaration is awaiting review." : "No declarations."));
    return;
  }
  replace(list, ...items.map((item) => reviewCard(item, () => breakGlassReviewsReload(root, status))));
}

async function breakGlassReviewsReload(root, status) {
  replace(root);
  await breakGlassReviews(root, status);
}

function statusBadge(item) {
  if (item.status !== "open") {
    return badge(item.outcome === "justified" ? "Reviewed: justified" : "Reviewed: unjustified",
      item.outcome === "justified" ? "ok" : "bad");
  }
  return item.overdue ? badge("Review overdue", "bad") : badge("Awaiting review", "pending");
}

function readsList(reads) {
  if (!reads.length) return h("p", { class: "muted small" }, "No emergency reads were logged under this declaration.");
  return h("ul", { class: "plain", "data-testid": "review-reads" }, reads.map((r) => h("li", {},
    timeEl(r.time), " · ",
    badge(r.outcome === "permit" ? "Permitted" : "Denied", r.outcome === "permit" ? "ok" : "bad"), " ",
    `${PURPOSE_LABELS[r.purpose] || r.purpose} · ${(r.resource_types || []).join(", ") || "all types"}`,
    r.records && r.records.length ? ` · ${r.records.length} record${r.records.length === 1 ? "" : "s"}` : "",
    r.tx ? h("span", {}, " · ", h("a", { href: `#/explorer/tx/${r.tx}`, title: r.tx }, `entry ${shortHash(r.tx)}`)) : "")));
}

function reviewCard(item, reload) {
  const card = h("section", { class: "card", "data-testid": "review", "data-id": item.id, "aria-labelledby": `rv-${item.id}` });
  card.append(h("h2", { id: `rv-${item.id}` }, `${item.actor} · patient ${item.patient}`, " ", statusBadge(item)),
    meta([
      ["Reason given", item.reason],
      ["Emergency window", h("span", {}, timeEl(item.from), " to ", timeEl(item.until))],
      ["Record types", (item.resource_types || []).join(", ") || "all types"],
      ["Review due", timeEl(item.deadline)],
      ["Declaration", h("a", { href: `#/explorer/tx/${item.id}`, title: item.id }, shortHash(item.id))],
      ["Reviewed by", item.reviewer],
      ["Reviewed", item.closed_at ? timeEl(item.closed_at) : null],
      ["Note", item.note],
    ]),
    h("h3", {}, "Reads under this declaration"),
    readsList(item.reads || []));
  if (item.status === "open") card.append(reviewForm(item, reload));
  return card;
}

function reviewForm(item, reload) {
  const justified = choice({ type: "radio", name: `outcome-${item.id}`, value: "justified", label: "Justified: a genuine emergency" });
  const unjustified = choice({ type: "radio", name: `outcome-${item.id}`, value: "unjustified", label: "Not justified" });
  const note = field({ label: "Note for the record", type: "textarea", name: `note-${item.id}`,
    hint: "Optional. What you checked; no patient-identifying details (it is on the ledger).", attrs: { maxlength: "1000" } });
  const submit = h("button", { type: "submit", class: "review-submit" }, "Record the review");
  const outcome = h("fieldset", {}, h("legend", {}, "Outcome"), justified.wrap, unjustified.wrap);
  const form = h("form", { novalidate: true, "aria-label": `Review of ${item.actor}'s emergency access` },
    outcome, note.wrap, h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const chosen = justified.input.checked ? "justified" : unjustified.input.checked ? "unjustified" : null;
    if (!chosen) {
      showError("Choose an outcome for the review.");
      justified.input.focus();
      return;
    }
    setFieldError(note.input, note.errId, "");
    submit.disabled = true;
    try {
      await request(`/api/break-glass/reviews/${item.id}`, { method: "POST", body: { outcome: chosen, note: note.input.value.trim() } });
      announce(`Review recorded: ${chosen}.`);
      await reload();
    } catch (e) {
      showError(`The review was not recorded: ${e.message}`);
      submit.disabled = false;
    }
  });
  return form;
}
