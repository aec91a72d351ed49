// The unified timeline: a patient's records from every organisation, grouped by date,
// each with the organisation that holds it. Shared by the patient and clinician views.

import { orgName } from "./api.js";
import { custodianOf, dateOf, RESOURCE_LABELS, resourcesOf, statusOf, titleOf, valueText, withheldNotices } from "./fhir.js";
import { add, badge, field, h, meta, notice, replace, toDate } from "./ui.js";

const PAGE = 100;

function dayKey(r) {
  const d = toDate(dateOf(r));
  return d ? d.toISOString().slice(0, 10) : "undated";
}

function dayHeading(key) {
  if (key === "undated") return "Undated";
  const d = new Date(`${key}T00:00:00Z`);
  return d.toLocaleDateString(undefined, { weekday: "short", year: "numeric", month: "long", day: "numeric", timeZone: "UTC" });
}

function recordItem(r) {
  const custodian = custodianOf(r);
  const value = valueText(r);
  const status = statusOf(r);
  return h("li", { class: "item", dataset: { type: r.resourceType, id: r.id || "" } },
    h("div", { class: "item-head" },
      h("span", { class: "item-title" }, titleOf(r)),
      badge(RESOURCE_LABELS[r.resourceType] || r.resourceType, "type")),
    meta([
      ["Value", value],
      ["Status", status],
      ["Held by", custodian ? orgName(custodian) : "unknown organisation"],
    ]));
}

/** Withheld-data notice from a $everything Bundle (null when nothing is withheld). */
export function withheldNotice(bundle) {
  const notes = withheldNotices(bundle).filter((n) => n.code === "suppressed" || /withh/i.test(n.text));
  if (!notes.length) return null;
  return notice("warn",
    h("h2", { class: "notice-title" }, "Some records are withheld"),
    h("ul", { "data-testid": "withheld" }, notes.map((n) => h("li", {}, n.text || "Records withheld", n.codes.length ? ` (${n.codes.join(", ")})` : ""))),
    h("p", { class: "small" }, "Only what the patient's consent and the sharing rules permit is shown. Every access, permitted or not, is recorded on the ledger."));
}

/** Render a timeline of resources into `container`, with a type filter. */
export function renderTimeline(container, entries, { showPatient = false } = {}) {
  const resources = resourcesOf(entries).filter((r) => showPatient || r.resourceType !== "Patient");
  const types = [...new Set(resources.map((r) => r.resourceType))].sort();
  const orgs = [...new Set(resources.map(custodianOf).filter(Boolean))];
  const listWrap = h("div", { "data-testid": "timeline" });
  const filter = field({
    label: "Show",
    type: "select",
    name: "type-filter",
    options: [{ value: "", label: `All records (${resources.length})` },
      ...types.map((t) => ({ value: t, label: `${RESOURCE_LABELS[t] || t} (${resources.filter((r) => r.resourceType === t).length})` }))],
  });

  let limit = PAGE;

  function draw() {
    const want = filter.input.value;
    const matching = resources.filter((r) => !want || r.resourceType === want)
      .sort((a, b) => String(dateOf(b) || "").localeCompare(String(dateOf(a) || "")));
    const shown = matching.slice(0, limit);
    const groups = new Map();
    for (const r of shown) {
      const k = dayKey(r);
      if (!groups.has(k)) groups.set(k, []);
      groups.get(k).push(r);
    }
    const keys = [...groups.keys()].sort((a, b) => (a === "undated" ? 1 : b === "undated" ? -1 : b.localeCompare(a)));
    if (!shown.length) {
      replace(listWrap, h("p", { class: "muted" }, "No records to show."));
      return;
    }
    replace(listWrap, keys.map((k) => h("section", { class: "date-group", "aria-label": dayHeading(k) },
      h("h2", {}, dayHeading(k)),
      h("ul", { class: "list" }, groups.get(k).map(recordItem)))),
    matching.length > shown.length ? h("div", { class: "actions" },
      h("span", { class: "muted small" }, `Showing ${shown.length} of ${matching.length}.`),
      h("button", { type: "button", class: "secondary", "data-action": "more", onclick: () => {
        const before = shown.length;
        limit += PAGE;
        draw();
        const items = listWrap.querySelectorAll("li.item");
        if (items[before]) { items[before].setAttribute("tabindex", "-1"); items[before].focus(); }
      } }, `Show ${Math.min(PAGE, matching.length - shown.length)} more`)) : null);
  }
  filter.input.addEventListener("change", () => { limit = PAGE; draw(); });
  add(container,
    h("p", { class: "muted" }, `${resources.length} records from ${orgs.length || "no"} organisation${orgs.length === 1 ? "" : "s"}` +
      (orgs.length ? `: ${orgs.map(orgName).join(", ")}.` : ".")),
    types.length > 1 ? h("div", { class: "field-row" }, filter.wrap) : null,
    listWrap);
  draw();
}
