// Reading FHIR R4 resources for display: dates, one-line summaries, the custodian
// organisation, withheld-data notices and IHE BALP AuditEvents.

export const RESOURCE_LABELS = {
  Patient: "Patient",
  Observation: "Observation",
  Condition: "Condition",
  Encounter: "Encounter",
  Procedure: "Procedure",
  MedicationRequest: "Medication",
  AllergyIntolerance: "Allergy",
  Immunization: "Immunization",
  DiagnosticReport: "Report",
  DocumentReference: "Document",
  Consent: "Consent",
  AuditEvent: "Audit event",
};

export const SHAREABLE_TYPES = [
  "Observation", "Condition", "Encounter", "Procedure", "MedicationRequest",
  "AllergyIntolerance", "Immunization", "DiagnosticReport", "DocumentReference", "Patient",
];

function periodStart(p) {
  return p && (p.start || p.end);
}

/** The clinically relevant date of a resource (ISO string) or null. */
export function dateOf(r) {
  if (!r || typeof r !== "object") return null;
  return (
    r.effectiveDateTime || r.effectiveInstant || periodStart(r.effectivePeriod) ||
    r.onsetDateTime || periodStart(r.onsetPeriod) || r.recordedDate ||
    r.performedDateTime || periodStart(r.performedPeriod) ||
    r.authoredOn || r.occurrenceDateTime || r.issued || r.date ||
    periodStart(r.period) || r.recorded || r.dateTime || r.birthDate ||
    (r.meta && r.meta.lastUpdated) || null
  );
}

export function codingText(cc) {
  if (!cc) return "";
  if (Array.isArray(cc)) return cc.map(codingText).filter(Boolean).join(", ");
  if (cc.text) return cc.text;
  const c = (cc.coding || []).find((x) => x.display) || (cc.coding || [])[0];
  if (c) return c.display || c.code || "";
  if (cc.display) return cc.display;
  return cc.code || "";
}

function number(v) {
  const n = Number(v);
  if (!Number.isFinite(n)) return String(v);
  return n.toLocaleString(undefined, { maximumFractionDigits: Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2 });
}

function quantity(q) {
  if (!q || q.value === undefined) return "";
  const unit = q.unit || q.code || "";
  return `${q.comparator || ""}${number(q.value)}${unit && unit !== "1" ? ` ${unit}` : ""}`;
}

export function valueText(r) {
  if (r.valueQuantity) return quantity(r.valueQuantity);
  if (r.valueCodeableConcept) return codingText(r.valueCodeableConcept);
  if (r.valueString) return r.valueString;
  if (r.valueBoolean !== undefined) return r.valueBoolean ? "yes" : "no";
  if (r.valueInteger !== undefined) return String(r.valueInteger);
  if (Array.isArray(r.component) && r.component.length) {
    return r.component.map((c) => `${codingText(c.code)} ${quantity(c.valueQuantity) || codingText(c.valueCodeableConcept)}`.trim()).join("; ");
  }
  return "";
}

export function humanName(p) {
  const n = p && Array.isArray(p.name) ? p.name.find((x) => x.use === "official") || p.name[0] : null;
  if (!n) return "";
  if (n.text) return n.text;
  return [...(n.prefix || []), ...(n.given || []), n.family].filter(Boolean).join(" ");
}

/** One-line title of a resource. */
export function titleOf(r) {
  switch (r.resourceType) {
    case "Patient": return humanName(r) || `Patient ${r.id}`;
    case "MedicationRequest":
      return codingText(r.medicationCodeableConcept) || (r.medicationReference && r.medicationReference.display) || "Medication";
    case "Immunization": return codingText(r.vaccineCode) || "Immunization";
    case "Encounter": return codingText(r.type) || codingText(r.reasonCode) || (r.class && (r.class.display || r.class.code)) || "Encounter";
    case "DocumentReference": return r.description || codingText(r.type) || "Document";
    case "Consent": return "Consent";
    default: return codingText(r.code) || r.resourceType;
  }
}

export function statusOf(r) {
  const s = r.clinicalStatus ? codingText(r.clinicalStatus) : r.status;
  return s || "";
}

const CUSTODIAN_HINTS = ["custodian", "medledger"];

function orgFromReference(ref) {
  if (!ref) return null;
  const text = typeof ref === "string" ? ref : ref.reference || (ref.identifier && ref.identifier.value) || "";
  const m = /(?:^|\/)Organization\/([^/]+)$/.exec(text);
  if (m) return m[1];
  return null;
}

// Custodians learnt from the ledger (see fillCustodians in api.js), by resource object.
const ledgerCustodian = new WeakMap();

export function setCustodian(resource, org) {
  ledgerCustodian.set(resource, org);
}

/**
 * The organisation that holds a record: as registered on the ledger when known,
 * else as the API reports it (a meta.tag or extension naming the custodian,
 * meta.source), else the resource's own custodian / managingOrganization reference.
 */
export function custodianOf(r) {
  if (!r) return null;
  if (ledgerCustodian.has(r)) return ledgerCustodian.get(r);
  const metaObj = r.meta || {};
  for (const tag of metaObj.tag || []) {
    if (tag.system && CUSTODIAN_HINTS.some((x) => tag.system.toLowerCase().includes(x)) && /custodian/i.test(tag.system)) {
      return tag.code || tag.display;
    }
  }
  for (const ext of [...(metaObj.extension || []), ...(r.extension || [])]) {
    if (ext.url && /custodian/i.test(ext.url)) {
      return orgFromReference(ext.valueReference) || ext.valueString || ext.valueCode ||
        (ext.valueReference && ext.valueReference.display) || null;
    }
  }
  if (metaObj.source) {
    const src = String(metaObj.source);
    const org = orgFromReference(src) || (src.startsWith("#") ? src.slice(1) : null);
    if (org) return org;
    const m = /[#/]([A-Za-z0-9._-]+)$/.exec(src);
    if (m) return m[1];
  }
  return orgFromReference(r.custodian) || orgFromReference(r.managingOrganization) || null;
}

/** Notices about withheld data carried by a Bundle (OperationOutcome entries or extensions). */
export function withheldNotices(bundle) {
  const out = [];
  if (!bundle) return out;
  const outcomes = [];
  for (const e of bundle.entry || []) {
    if (e.resource && e.resource.resourceType === "OperationOutcome") outcomes.push(e.resource);
  }
  if (bundle.issues && bundle.issues.resourceType === "OperationOutcome") outcomes.push(bundle.issues);
  for (const oo of outcomes) {
    for (const issue of oo.issue || []) {
      const codes = ((issue.details && issue.details.coding) || []).map((c) => c.display || c.code).filter(Boolean);
      const text = issue.diagnostics || (issue.details && issue.details.text) || "";
      out.push({ text, codes, severity: issue.severity || "information", code: issue.code || "" });
    }
  }
  for (const ext of [...(bundle.extension || []), ...((bundle.meta && bundle.meta.extension) || [])]) {
    if (ext.url && /withheld/i.test(ext.url)) {
      out.push({ text: ext.valueString || ext.valueCode || "Some records are withheld.", codes: [], severity: "information", code: "suppressed" });
    }
  }
  return out;
}

/** Resources of a Bundle, without OperationOutcome entries. */
export function resourcesOf(entries) {
  return entries.map((e) => e.resource).filter((r) => r && r.resourceType && r.resourceType !== "OperationOutcome");
}

// -- AuditEvent (IHE BALP) ----------------------------------------------------------------------

function refText(ref) {
  if (!ref) return "";
  return ref.display || ref.reference || (ref.identifier && ref.identifier.value) || "";
}

function idOf(ref, type) {
  const t = refText(ref);
  const m = new RegExp(`(?:^|/)${type}/([^/]+)$`).exec(ref && ref.reference ? ref.reference : "");
  return m ? m[1] : t;
}

function codes(list) {
  const out = [];
  for (const cc of list || []) {
    for (const c of cc.coding || []) if (c.code) out.push(c.code);
    if (cc.code) out.push(cc.code);
  }
  return out;
}

/** What "who saw my data" shows about one AuditEvent. */
export function auditSummary(ae) {
  const agents = ae.agent || [];
  const requestor = agents.find((a) => a.requestor) || agents.find((a) => a.who && /Practitioner|Patient|Device/.test(a.who.reference || "")) || agents[0] || {};
  let org = null;
  for (const a of agents) {
    const ref = a.who && a.who.reference;
    if (ref && /(^|\/)Organization\//.test(ref)) { org = idOf(a.who, "Organization"); break; }
  }
  if (!org) {
    for (const a of agents) {
      if (a.location && a.location.reference) { org = refText(a.location); break; }
    }
  }
  const purposes = [...codes(ae.purposeOfEvent), ...agents.flatMap((a) => codes(a.purposeOfUse))];
  const outcome = ae.outcome === undefined ? "" : String(ae.outcome);
  const permitted = outcome === "0";
  const security = codes(((ae.meta && ae.meta.security) ? [{ coding: ae.meta.security }] : []));
  const breakGlass = purposes.includes("ETREAT") || purposes.includes("BTG") || security.includes("BTG") ||
    (ae.extension || []).some((x) => /break-?glass/i.test(x.url || "") && x.valueBoolean !== false);
  const entities = ae.entity || [];
  const types = [];
  const addType = (t) => { if (t && !types.includes(t)) types.push(t); };
  for (const e of entities) {
    const ref = e.what && e.what.reference;
    if (ref && !/^(Patient|Consent)\//.test(ref)) addType(ref.split("/")[0]);
    for (const d of e.detail || []) {
      if (d.type === "resource_types" && d.valueString) d.valueString.split(",").forEach((t) => addType(t.trim()));
    }
  }
  const action = { R: "read", E: "search", C: "create", U: "update", D: "delete" }[ae.action] ||
    (ae.subtype && ae.subtype.length ? (ae.subtype[0].display || ae.subtype[0].code) : "access");
  const whoRef = (requestor.who && requestor.who.reference) || "";
  const roles = codes(requestor.role);
  let who = refText(requestor.who) || "unknown";
  const m = /^(Practitioner|Patient|Device|RelatedPerson)\/(.+)$/.exec(whoRef);
  if (m) who = m[1] === "Patient" ? `Patient ${m[2]}` : m[2];
  return {
    id: ae.id,
    time: ae.recorded || (ae.period && ae.period.start),
    who,
    whoKind: m ? m[1] : "",
    whoId: m ? m[2] : who,
    roles,
    whoRef,
    org,
    purposes: [...new Set(purposes)],
    outcome,
    permitted,
    outcomeText: permitted ? "permitted" : outcome ? "denied" : "unknown",
    breakGlass,
    action,
    types,
    description: ae.outcomeDesc || "",
  };
}
