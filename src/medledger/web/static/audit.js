// "Who saw my data": every access decision about the patient, each checked in the
// browser against the ledger — the entry's own bytes, its RFC 9162 inclusion
// proof and the checkpoint's Ed25519 signatures — before it is marked verified.

import { fhirSearchAll, orgName, request } from "./api.js";
import { decodeCbor } from "./cbor.js";
import { auditSummary } from "./fhir.js";
import { myPatientId } from "./patient.js";
import { announce, badge, choice, h, meta, notice, replace, timeEl } from "./ui.js";
import { b64decodeStrict, verifyEntry, VerifyError } from "./verify.js";

export const PURPOSE_LABELS = {
  TREAT: "treatment",
  ETREAT: "emergency treatment",
  HPAYMT: "payment",
  HOPERAT: "healthcare operations",
  HRESCH: "research",
  PATRQT: "your own request",
  PUBHLTH: "public health",
  HMARKT: "marketing",
  HSYSADMIN: "system administration",
  CAREMGT: "care management",
  FAMRQT: "family request",
  HDIRECT: "directory",
  HLEGAL: "legal",
};

/** The purposes a patient most often chooses, shown first in the consent form. */
export const MAIN_PURPOSES = ["TREAT", "ETREAT", "CAREMGT", "HPAYMT", "HOPERAT", "HRESCH", "PUBHLTH"];

export function purposeText(codes) {
  return codes.map((c) => PURPOSE_LABELS[c] ? `${PURPOSE_LABELS[c]} (${c})` : c).join(", ");
}

function paramValue(p) {
  for (const [k, v] of Object.entries(p)) if (k.startsWith("value")) return v;
  return undefined;
}

/** The inclusion proof from a $proof answer: bare JSON or a FHIR Parameters resource. */
export function normaliseProof(doc) {
  if (!doc || typeof doc !== "object") throw new VerifyError("the proof answer is empty");
  if (doc.resourceType === "Parameters") {
    const out = { proof: [] };
    const walk = (params) => {
      for (const p of params || []) {
        if (p.part) walk(p.part);
        const v = paramValue(p);
        if (v === undefined) continue;
        if (p.name === "proof" || p.name === "path") {
          if (Array.isArray(v)) out.proof.push(...v);
          else if (typeof v === "string" && v.includes(",")) out.proof.push(...v.split(",").map((x) => x.trim()).filter(Boolean));
          else if (v !== "") out.proof.push(v);
        } else {
          out[p.name] = v;
        }
      }
    };
    walk(doc.parameter);
    const alias = { leafIndex: "leaf_index", treeSize: "tree_size", leafHash: "leaf_hash", canonicalTransaction: "canonical_bytes" };
    for (const [from, to] of Object.entries(alias)) if (out[to] === undefined && out[from] !== undefined) out[to] = out[from];
    return out;
  }
  if (doc.inclusion && typeof doc.inclusion === "object") return { ...doc, ...doc.inclusion };
  if (doc.proof && !Array.isArray(doc.proof) && typeof doc.proof === "object") return { ...doc, ...doc.proof };
  return doc;
}

function bytesFrom(value) {
  if (typeof value !== "string") return null;
  return b64decodeStrict(value) || (/^(?:[0-9a-f]{2})+$/i.test(value) ? Uint8Array.from(value.match(/../g), (x) => parseInt(x, 16)) : null);
}

/**
 * Verify one AuditEvent: fetch its proof and the entry's canonical bytes, verify them,
 * and check that the proven entry is an access.log about this patient with the
 * outcome the AuditEvent shows. Returns {ok: true, ...} or {ok: false, reason}.
 */
export async function verifyAuditEvent(ae, patientId, verifierKeys) {
  try {
    // The explorer's proof endpoint, not AuditEvent/$proof: the latter is itself a logged
    // access, so checking N entries would add N entries on every visit.
    const proof = normaliseProof(await request(`/api/ledger/tx/${encodeURIComponent(ae.id)}/proof`));
    let raw = bytesFrom(proof.canonical_bytes || proof.canonicalTransaction || proof.tx || proof.entry);
    if (!raw) {
      const tx = await request(`/api/ledger/tx/${encodeURIComponent(ae.id)}`);
      raw = bytesFrom(tx.canonical_bytes);
    }
    if (!raw) throw new VerifyError("the ledger entry's bytes are not available");
    const result = await verifyEntry({ entryBytes: raw, txId: ae.id, proof, verifierKeys });
    const tx = decodeCbor(raw);
    if (!tx || tx.type !== "access.log" || typeof tx.payload !== "object") {
      throw new VerifyError("the proven entry is not an access record");
    }
    const p = tx.payload;
    if (p.patient !== patientId) throw new VerifyError("the proven entry is about someone else");
    const summary = auditSummary(ae);
    const ledgerPermit = p.outcome === "permit";
    if (summary.outcome !== "" && ledgerPermit !== summary.permitted) {
      throw new VerifyError("the outcome shown differs from the ledger entry");
    }
    if (Boolean(p.break_glass) !== summary.breakGlass && p.break_glass) {
      throw new VerifyError("the ledger entry is a break-glass access but is not shown as one");
    }
    return { ok: true, ...result, payload: p };
  } catch (e) {
    return { ok: false, reason: e instanceof VerifyError ? e.message : `could not check (${e.message})` };
  }
}

function verifyBadge(state, text) {
  const label = { pending: "Checking…", verified: "✓ Verified", unverified: "✗ Not verified" }[state];
  const b = badge(label, state);
  b.dataset.verify = state;
  if (text) b.title = text;
  return b;
}

function auditItem(ae, patientId) {
  const s = auditSummary(ae);
  s.self = s.whoKind === "Patient" && s.whoId === patientId;
  const whoText = s.self ? "You" : s.roles.length ? `${s.who} (${s.roles.join(", ")})` : s.who;
  const classes = ["item", s.permitted ? "permitted" : "denied"];
  if (s.breakGlass) classes.push("break-glass");
  const vslot = h("span", { class: "verify-slot" }, verifyBadge("pending"));
  const detail = h("p", { class: "verify-detail", "aria-live": "polite" });
  const li = h("li", { class: classes.join(" "), dataset: { auditId: ae.id || "", breakGlass: s.breakGlass ? "true" : "false", outcome: s.outcomeText, who: s.whoId, self: s.self ? "true" : "false" } },
    h("div", { class: "item-head" },
      h("span", { class: "item-title" }, whoText),
      h("span", {},
        badge(s.permitted ? "Permitted" : "Denied", s.permitted ? "ok" : "bad"), " ",
        s.breakGlass ? badge("⚠ Emergency access (break-glass)", "glass") : null, s.breakGlass ? " " : null,
        vslot)),
    meta([
      ["Organisation", s.org ? orgName(s.org) : ""],
      ["Purpose", purposeText(s.purposes)],
      ["When", timeEl(s.time)],
      ["Action", s.action],
      ["Record types", s.types.join(", ")],
    ]),
    s.description ? h("p", { class: "small" }, s.description) : null,
    detail);
  return { li, summary: s, vslot, detail, event: ae };
}

/** The break-glass declaration (with its review) an emergency access was made under. */
function declarationFor(declarations, summary) {
  const t = Date.parse(summary.time || "");
  if (Number.isNaN(t)) return null;
  return declarations.find((d) => d.actor === summary.whoId && d.from <= t && t < d.until) || null;
}

function reviewLine(d) {
  let state;
  if (d.status !== "open") {
    state = [badge(d.outcome === "justified" ? "Reviewed: justified" : "Reviewed: not justified", d.outcome === "justified" ? "ok" : "bad"),
      ` by ${orgName(d.org)}'s privacy officer`, d.closed_at ? h("span", {}, " on ", timeEl(d.closed_at, true)) : "",
      d.note ? `: ${d.note}` : "."];
  } else if (d.overdue) {
    state = [badge("Review overdue", "bad"), ` ${orgName(d.org)}'s privacy officer was due to review this emergency access by `, timeEl(d.deadline, true), "."];
  } else {
    state = [badge("Awaiting review", "pending"), ` ${orgName(d.org)}'s privacy officer reviews this emergency access by `, timeEl(d.deadline, true), "."];
  }
  return h("p", { class: "small", "data-testid": "review-status" }, ...state,
    d.reason ? h("span", {}, " Reason given: ", h("q", {}, d.reason)) : "");
}

function describe(result) {
  const parts = [`Checked in your browser: entry ${result.leafIndex + 1} of ${result.treeSize} in the ledger`];
  if (result.signers && result.signers.length) parts.push(`in a checkpoint signed by ${result.signers.map((n) => orgName(n.split("/").pop())).join(", ")}`);
  const p = result.payload || {};
  const who = [p.actor && `by ${p.actor}`, p.org && `at ${orgName(p.org)}`].filter(Boolean).join(" ");
  return `${parts.join(", ")}. The ledger records this ${p.outcome || ""} ${who}`.trim() + ".";
}

async function runLimited(items, limit, fn) {
  let i = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (i < items.length) {
      const item = items[i++];
      await fn(item);
    }
  });
  await Promise.all(workers);
}

export async function patientAudit(root) {
  const pid = myPatientId();
  root.append(h("h1", {}, "Who saw my data"),
    h("p", { class: "muted" }, "Every time someone asked to see your records — and whether they were allowed — is recorded on the ledger. Your browser checks each entry against the ledger's signed checkpoint before marking it verified."));
  const status = h("p", { class: "muted", role: "status" }, "Loading the access record…");
  root.append(status);
  const [cp, search] = await Promise.all([
    request("/api/ledger/checkpoint", { auth: false }),
    fhirSearchAll(`/fhir/AuditEvent?patient=${encodeURIComponent(pid)}&_count=100`),
  ]);
  status.remove();
  const events = search.entries.map((e) => e.resource).filter((r) => r && r.resourceType === "AuditEvent");
  events.sort((a, b) => String(b.recorded || "").localeCompare(String(a.recorded || "")));
  const items = events.map((ae) => auditItem(ae, pid));
  const others = items.filter((i) => !i.summary.self);
  const denied = others.filter((i) => !i.summary.permitted).length;
  const glass = items.filter((i) => i.summary.breakGlass).length;
  const hideOwn = choice({ name: "hide-own", label: "Hide my own visits to this portal", checked: true });
  const applyFilter = () => {
    for (const i of items) i.li.hidden = hideOwn.input.checked && i.summary.self;
  };
  hideOwn.input.addEventListener("change", applyFilter);
  const summary = h("div", { "data-testid": "audit-summary" },
    h("p", {}, `${others.length} access${others.length === 1 ? "" : "es"} by others recorded, ${denied} denied` +
      ` (and ${items.length - others.length} by you).`),
    glass ? notice("glass", h("strong", {}, `${glass} emergency (break-glass) access${glass === 1 ? "" : "es"}. `),
      "A clinician used emergency access to your records. Each one must be reviewed by the organisation's privacy officer.") : null);
  const progress = h("p", { class: "muted small", "aria-live": "polite" });
  root.append(summary, progress);
  if (!events.length) {
    root.append(h("p", {}, "Nobody has accessed your records yet."));
    return;
  }
  root.append(hideOwn.wrap, h("ul", { class: "list", "data-testid": "audit-list" }, items.map((i) => i.li)));
  applyFilter();
  if (glass) {
    // each emergency access with the review of the declaration it was made under
    let declarations = [];
    try {
      declarations = await request("/api/break-glass/reviews");
    } catch {
      declarations = [];
    }
    for (const i of items) {
      const d = i.summary.breakGlass ? declarationFor(declarations, i.summary) : null;
      if (d) i.detail.before(reviewLine(d));
    }
  }
  if (search.more) root.append(notice("", "Only the most recent entries are shown."));

  let done = 0;
  let ok = 0;
  const keys = cp.verifier_keys || [];
  const order = [...others, ...items.filter((i) => i.summary.self)];
  await runLimited(order, 3, async (item) => {
    const result = await verifyAuditEvent(item.event, pid, keys);
    done += 1;
    if (result.ok) {
      ok += 1;
      replace(item.vslot, verifyBadge("verified", "Inclusion proof and checkpoint signatures checked in this browser"));
      item.detail.textContent = describe(result);
    } else {
      replace(item.vslot, verifyBadge("unverified", result.reason));
      item.detail.textContent = `Not verified: ${result.reason}`;
    }
    item.li.dataset.verified = result.ok ? "true" : "false";
    progress.textContent = `Checked ${done} of ${items.length}.`;
  });
  progress.textContent = `${ok} of ${items.length} entries verified against the ledger in your browser.`;
  announce(progress.textContent);
}
