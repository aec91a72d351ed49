// Talking to the node: the session (token kept in sessionStorage only), a fetch
// wrapper that turns FHIR OperationOutcomes and API errors into readable
// messages, and small FHIR helpers (bundles, paging).

import { setCustodian } from "./fhir.js";

const KEY = "medledger.session";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

// -- session ------------------------------------------------------------------------------------

let cached = null;

export function getSession() {
  if (cached) return cached;
  try {
    cached = JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    cached = null;
  }
  return cached;
}

/** Whether the signed-in identity may hold ``role`` (roles unknown, e.g. a token
 * sign-in: yes, and the server decides). */
export function mayHaveRole(role) {
  const s = getSession();
  const roles = s && s.identity && s.identity.roles;
  return !Array.isArray(roles) || !roles.length || roles.includes(role);
}

export function setSession(session) {
  cached = session;
  if (session) sessionStorage.setItem(KEY, JSON.stringify(session));
  else sessionStorage.removeItem(KEY);
  for (const fn of listeners) fn(session);
}

/** Store the session's new activity time without telling listeners (nothing else changed). */
export function persistSession(session) {
  cached = session;
  if (session) sessionStorage.setItem(KEY, JSON.stringify(session));
}

export function onSessionChange(fn) {
  listeners.add(fn);
}

export function sessionFromToken(token, identity, expiresIn, demo) {
  return {
    token,
    identity,
    demo: demo || null,
    expiresAt: Date.now() + (Number(expiresIn) || 300) * 1000,
    lastActivity: Date.now(),
  };
}

export async function demoLogin(identityId) {
  const body = await request("/api/demo/login", {
    method: "POST",
    body: { identity: identityId },
    auth: false,
  });
  return sessionFromToken(body.access_token, body.identity, body.expires_in, identityId);
}

export async function tokenLogin(token) {
  const who = await request("/api/session", { auth: false, headers: { Authorization: `Bearer ${token}` } });
  const expiresIn = who.expires_at ? who.expires_at - Math.floor(Date.now() / 1000) : 300;
  return sessionFromToken(token, { ...who, label: who.subject, kind: who.subject_kind }, expiresIn, null);
}

// -- requests -------------------------------------------------------------------------------------

function messageOf(status, body) {
  if (body && typeof body === "object") {
    if (body.resourceType === "OperationOutcome" && Array.isArray(body.issue)) {
      const parts = body.issue.map((i) => i.diagnostics || (i.details && i.details.text) || i.code).filter(Boolean);
      if (parts.length) return parts.join("; ");
    }
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    if (body.error_description) return body.error_description;
    if (body.error) return String(body.error);
  }
  if (status === 401) return "You are not signed in, or your session has expired.";
  if (status === 403) return "Access denied.";
  if (status === 404) return "Not found.";
  return `The server answered ${status}.`;
}

let refreshing = null;

async function refreshDemoToken(session) {
  if (!refreshing) {
    refreshing = demoLogin(session.demo)
      .then((fresh) => {
        fresh.lastActivity = session.lastActivity;
        setSession(fresh);
        return fresh;
      })
      .finally(() => { refreshing = null; });
  }
  return refreshing;
}

/**
 * fetch() a same-origin path; returns parsed JSON (or null for 204).
 * Options: method, body (JSON-encoded unless a string), headers, auth (default true), fhir.
 */
export async function request(path, { method = "GET", body, headers = {}, auth = true, fhir = false, retry = true } = {}) {
  const h = { Accept: fhir ? "application/fhir+json" : "application/json", ...headers };
  let payload;
  if (body !== undefined) {
    payload = typeof body === "string" ? body : JSON.stringify(body);
    h["Content-Type"] = fhir ? "application/fhir+json" : "application/json";
  }
  let session = auth ? getSession() : null;
  if (auth) {
    if (!session) throw new ApiError(401, "You are not signed in.");
    if (session.demo && session.expiresAt - Date.now() < 5000) session = await refreshDemoToken(session);
    h.Authorization = `Bearer ${session.token}`;
  }
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: payload, credentials: "omit", cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, `Cannot reach the node (${e.message}).`);
  }
  if (res.status === 401 && auth && retry && session && session.demo) {
    await refreshDemoToken(session);
    return request(path, { method, body, headers, auth, fhir, retry: false });
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!res.ok) throw new ApiError(res.status, messageOf(res.status, data), data);
  return data;
}

export const fhirGet = (path, opts = {}) => request(path, { ...opts, fhir: true });

/**
 * The path of a FHIR paging link, always fetched from this page's own origin: the
 * server builds links from its configured base URL, which may name another host
 * for the same node, and the token must never be sent anywhere else.
 */
function relative(url) {
  const u = new URL(url, location.href);
  return u.pathname + u.search;
}

/** Fetch a searchset and follow `next` links up to maxPages. Returns {entries, total, more}. */
export async function fhirSearchAll(path, { maxPages = 10, headers } = {}) {
  const entries = [];
  let next = path;
  let total = null;
  let pages = 0;
  let first = null;
  while (next && pages < maxPages) {
    const bundle = await fhirGet(next, { headers });
    if (!first) first = bundle;
    pages += 1;
    if (bundle && typeof bundle.total === "number" && total === null) total = bundle.total;
    for (const e of (bundle && bundle.entry) || []) entries.push(e);
    const link = ((bundle && bundle.link) || []).find((l) => l.relation === "next");
    next = link ? relative(link.url) : null;
  }
  return { entries, total, more: Boolean(next), bundle: first };
}

/** Label resources with the organisation the ledger says holds them (one request per 1000). */
export async function fillCustodians(resources) {
  const list = resources.filter((r) => r && r.id && r.resourceType !== "OperationOutcome");
  for (let i = 0; i < list.length; i += 1000) {
    const chunk = list.slice(i, i + 1000);
    try {
      const found = await request("/api/ledger/custodians", { method: "POST", body: { ids: chunk.map((r) => r.id) } });
      for (const r of chunk) if (found[r.id]) setCustodian(r, found[r.id]);
    } catch {
      return; // labels fall back to what the API says
    }
  }
}

// -- directory (org names) -------------------------------------------------------------------------

let orgNames = new Map();
let checkpointInfo = null;

export async function loadOrgs() {
  try {
    checkpointInfo = await request("/api/ledger/checkpoint", { auth: false });
    orgNames = new Map((checkpointInfo.orgs || []).map((o) => [o.id, o.name || o.id]));
  } catch {
    /* the explorer reports errors itself; names fall back to ids */
  }
  return checkpointInfo;
}

export function orgName(id) {
  if (!id) return "";
  return orgNames.get(id) || id;
}
