// The portal shell: hash routes, navigation by role, sign-in and sign-out.

import { ApiError, demoLogin, getSession, loadOrgs, onSessionChange, orgName, request, setSession, tokenLogin } from "./api.js";
import { startIdleWatch } from "./session.js";
import { announce, clearError, field, focusHeading, h, notice, replace, setFieldError, showError } from "./ui.js";
import { patientTimeline, patientPrivacy } from "./patient.js";
import { patientAudit } from "./audit.js";
import { patientConsent } from "./consent.js";
import { clinicianSearch, clinicianPatient } from "./clinician.js";
import { breakGlassReviews, mayReview } from "./reviews.js";
import { explorerHome, explorerBlock, explorerTx } from "./explorer.js";

const main = () => document.getElementById("main");
let signedOutReason = null;
let renderToken = 0;

const NAV = {
  patient: [
    ["#/patient/timeline", "My records"],
    ["#/patient/audit", "Who saw my data"],
    ["#/patient/consent", "Sharing"],
    ["#/patient/privacy", "Privacy"],
    ["#/explorer", "Ledger"],
  ],
  practitioner: [
    ["#/clinician", "Find a patient"],
    ["#/explorer", "Ledger"],
  ],
  system: [["#/explorer", "Ledger"]],
  none: [
    ["#/signin", "Sign in"],
    ["#/explorer", "Ledger"],
  ],
};

function kind() {
  const s = getSession();
  return s ? s.identity.subject_kind || s.identity.kind || "system" : "none";
}

function homeRoute() {
  return { patient: "#/patient/timeline", practitioner: "#/clinician", system: "#/explorer" }[kind()] || "#/signin";
}

function navItems() {
  const items = NAV[kind()] || NAV.none;
  if (kind() !== "practitioner" || !mayReview()) return items;
  return [items[0], ["#/clinician/reviews", "Break-glass reviews"], ...items.slice(1)];
}

function renderNav(hash) {
  const nav = document.getElementById("nav");
  const items = navItems();
  // the most specific link the page is under is the current one
  const current = items.map(([href]) => href).filter((href) => hash.startsWith(href))
    .sort((a, b) => b.length - a.length)[0];
  replace(nav, h("ul", {}, items.map(([href, label]) =>
    h("li", {}, h("a", { href, "aria-current": href === current ? "page" : null }, label)))));
  const who = document.getElementById("who");
  const s = getSession();
  if (s) {
    const ident = s.identity || {};
    const org = ident.org ? ` · ${orgName(ident.org)}` : "";
    replace(who,
      h("span", { "data-testid": "signed-in-as" }, "Signed in as ", h("strong", {}, ident.label || ident.subject), org),
      h("button", { type: "button", class: "secondary", id: "sign-out", onclick: () => signOut("user") }, "Sign out"));
  } else {
    replace(who);
  }
}

export function signOut(reason) {
  setSession(null);
  signedOutReason = reason;
  replace(main()); // drop anything that was displayed
  if (reason === "inactivity") announce("You were signed out after a period of inactivity.");
  else if (reason === "user") announce("You are signed out.");
  history.replaceState(null, "", "#/signin"); // no hashchange: render once, with the reason
  route();
}

// -- sign-in --------------------------------------------------------------------------------------

async function signInView(root) {
  root.append(h("h1", {}, "Sign in"));
  if (signedOutReason === "inactivity") {
    root.append(notice("warn", "You were signed out automatically after a period of inactivity, to protect your health information."));
  } else if (signedOutReason === "expired") {
    root.append(notice("warn", "Your session expired. Please sign in again."));
  }
  signedOutReason = null;

  let identities = null;
  try {
    identities = await request("/api/demo/identities", { auth: false });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) showError(`Cannot load the demo identities: ${e.message}`);
  }

  if (identities && identities.length) {
    const form = h("form", { class: "card", "aria-labelledby": "demo-title" });
    form.append(h("h2", { id: "demo-title" }, "Demo identities"),
      h("p", { class: "muted" }, "This node runs in demo mode: pick who you are. Each choice uses that person's SMART client to get a short-lived access token."));
    const groups = [["patient", "Patients"], ["practitioner", "Clinicians"], ["system", "Systems"]];
    let first = true;
    for (const [k, title] of groups) {
      const list = identities.filter((i) => (i.kind || "system") === k);
      if (!list.length) continue;
      const fs = h("fieldset", {}, h("legend", {}, title));
      const grid = h("div", { class: "identity-list" });
      for (const ident of list) {
        const id = `ident-${ident.id}`;
        const radio = h("input", { type: "radio", name: "identity", id, value: ident.id, required: true, checked: first });
        first = false;
        const org = ident.org_name || orgName(ident.org);
        grid.append(h("label", { class: "identity", for: id }, radio,
          h("span", {}, h("strong", {}, ident.label || ident.id),
            h("span", { class: "muted small" }, `${{ patient: "Patient", practitioner: "Clinician", system: "System client" }[k] || k}${org ? ` at ${org}` : ""}`))));
      }
      fs.append(grid);
      form.append(fs);
    }
    const submit = h("button", { type: "submit", id: "demo-sign-in" }, "Sign in");
    form.append(h("div", { class: "actions" }, submit));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearError();
      const chosen = form.querySelector("input[name=identity]:checked");
      if (!chosen) {
        showError("Choose an identity first.");
        return;
      }
      submit.disabled = true;
      try {
        const session = await demoLogin(chosen.value);
        setSession(session);
        announce(`Signed in as ${session.identity.label || session.identity.subject}.`);
        location.hash = homeRoute();
      } catch (e) {
        showError(`Sign-in failed: ${e.message}`);
      } finally {
        submit.disabled = false;
      }
    });
    root.append(form);
  }

  // Sign in with a token from a SMART Backend Services client.
  const tokenForm = h("form", { class: "card", "aria-labelledby": "token-title" });
  const tok = field({ label: "Access token", name: "token", type: "password", hint: "A bearer token from the node's /auth/token endpoint.", attrs: { autocomplete: "off" } });
  tokenForm.append(h("h2", { id: "token-title" }, "Use an access token"), tok.wrap,
    h("div", { class: "actions" }, h("button", { type: "submit", class: identities && identities.length ? "secondary" : "" }, "Sign in with token")));
  tokenForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const value = tok.input.value.trim();
    if (!value) {
      setFieldError(tok.input, tok.errId, "Enter an access token.");
      tok.input.focus();
      return;
    }
    setFieldError(tok.input, tok.errId, "");
    try {
      const session = await tokenLogin(value);
      setSession(session);
      location.hash = homeRoute();
    } catch (e) {
      setFieldError(tok.input, tok.errId, e.message);
      showError(`Sign-in failed: ${e.message}`);
      tok.input.focus();
    }
  });
  if (identities && identities.length) {
    root.append(h("details", {}, h("summary", {}, "Sign in with an access token instead"), tokenForm));
  } else {
    root.append(tokenForm);
  }
}

// -- routing --------------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/signin$/, "none", signInView],
  [/^#\/patient\/timeline$/, "patient", patientTimeline],
  [/^#\/patient\/audit$/, "patient", patientAudit],
  [/^#\/patient\/consent$/, "patient", patientConsent],
  [/^#\/patient\/privacy$/, "patient", patientPrivacy],
  [/^#\/clinician$/, "practitioner", clinicianSearch],
  [/^#\/clinician\/patient\/([A-Za-z0-9._-]+)$/, "practitioner", clinicianPatient],
  [/^#\/clinician\/reviews(?:\/(open|closed|all))?$/, "practitioner", breakGlassReviews],
  [/^#\/explorer$/, "any", explorerHome],
  [/^#\/explorer\/block\/(\d+)$/, "any", explorerBlock],
  [/^#\/explorer\/tx\/([0-9a-fA-F]{64})$/, "any", explorerTx],
];

async function route() {
  let hash = location.hash || "";
  if (!hash.startsWith("#/") || hash === "#/") {
    hash = homeRoute();
    history.replaceState(null, "", hash);
  }
  const me = kind();
  let match = null;
  for (const [re, who, view] of ROUTES) {
    const m = re.exec(hash);
    if (m) {
      match = { who, view, args: m.slice(1) };
      break;
    }
  }
  if (!match) {
    hash = homeRoute();
    history.replaceState(null, "", hash);
    return route();
  }
  if (match.who !== "any" && match.who !== "none" && match.who !== me) {
    if (me === "none") {
      signedOutReason = signedOutReason || null;
      history.replaceState(null, "", "#/signin");
      return route();
    }
    hash = homeRoute();
    history.replaceState(null, "", hash);
    return route();
  }
  if (match.who === "none" && me !== "none") {
    history.replaceState(null, "", homeRoute());
    return route();
  }
  clearError();
  renderNav(hash);
  const token = ++renderToken;
  const root = h("div", { class: "view" });
  const m = main();
  replace(m, root);
  m.setAttribute("aria-busy", "true");
  try {
    await match.view(root, ...match.args);
  } catch (e) {
    if (token !== renderToken) return;
    if (e instanceof ApiError && e.status === 401 && getSession()) {
      signOut("expired");
      return;
    }
    showError(e.message || String(e));
  }
  if (token === renderToken) {
    const title = root.querySelector("h1");
    document.title = title ? `${title.textContent} · medledger` : "medledger";
    m.removeAttribute("aria-busy");
    focusHeading(root);
  }
}

function start() {
  document.getElementById("skip-link").addEventListener("click", (ev) => {
    ev.preventDefault();
    const m = main();
    const heading = m.querySelector("h1");
    (heading || m).focus();
  });
  onSessionChange(() => renderNav(location.hash || ""));
  window.addEventListener("hashchange", route);
  startIdleWatch((reason) => signOut(reason));
  loadOrgs().finally(route);
}

start();
