// DOM helpers: build elements without innerHTML (nothing from the server is ever
// parsed as HTML), announce status to screen readers, show errors, format values.

let uid = 0;

/** Element builder: h("p", {class: "x", onclick: fn}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "text") {
      el.textContent = value;
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children to an element, skipping null/undefined/false (unlike Element.append). */
export function add(el, ...children) {
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

export function newId(prefix = "id") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Polite status message for assistive technology (and visible nowhere). */
export function announce(message) {
  const region = document.getElementById("status");
  if (!region) return;
  region.textContent = "";
  // a fresh text node after a tick makes screen readers announce repeats too
  setTimeout(() => { region.textContent = message; }, 30);
}

/** Show an error in the assertive alert region (empty message clears it). */
export function showError(message) {
  const region = document.getElementById("alert");
  if (!region) return;
  region.replaceChildren();
  if (message) region.appendChild(document.createTextNode(message));
}

export function clearError() {
  showError("");
}

/** A labelled form field. Returns {wrap, input}. */
export function field({ label, type = "text", name, hint, required, value, options, attrs = {} }) {
  const id = newId(name || "f");
  const hintId = hint ? `${id}-hint` : null;
  const errId = `${id}-err`;
  let input;
  if (type === "select") {
    input = h("select", { id, name, required, "aria-describedby": hintId, ...attrs },
      (options || []).map((o) => h("option", { value: o.value, selected: o.value === value }, o.label)));
  } else if (type === "textarea") {
    input = h("textarea", { id, name, required, "aria-describedby": hintId, ...attrs });
    if (value) input.value = value;
  } else {
    input = h("input", { id, name, type, required, value, "aria-describedby": hintId, ...attrs });
  }
  const wrap = h("div", { class: "field" },
    h("label", { for: id }, label, required ? h("span", { class: "hint" }, " (required)") : null),
    hint ? h("span", { class: "hint", id: hintId }, hint) : null,
    input,
    h("span", { class: "field-error", id: errId, hidden: true }));
  return { wrap, input, errId };
}

/** Mark a field invalid with a message (or clear it). */
export function setFieldError(input, errId, message) {
  const err = document.getElementById(errId);
  const described = (input.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && x !== errId);
  if (message) {
    input.setAttribute("aria-invalid", "true");
    described.push(errId);
    if (err) { err.textContent = message; err.hidden = false; }
  } else {
    input.removeAttribute("aria-invalid");
    if (err) { err.textContent = ""; err.hidden = true; }
  }
  if (described.length) input.setAttribute("aria-describedby", described.join(" "));
  else input.removeAttribute("aria-describedby");
}

/** A checkbox or radio with its label. */
export function choice({ type = "checkbox", name, value, label, checked }) {
  const id = newId(name || "c");
  const input = h("input", { type, id, name, value, checked });
  return { wrap: h("label", { class: "choice", for: id }, input, label), input };
}

/** <dl class="meta"> of label/value pairs (empty values are skipped). */
export function meta(pairs, cls = "meta") {
  return h("dl", { class: cls },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

export function badge(text, cls = "") {
  return h("span", { class: `badge ${cls}`.trim() }, text);
}

export function notice(kind, ...children) {
  return h("div", { class: `notice ${kind}` }, ...children);
}

// -- formatting -------------------------------------------------------------------------------

export function toDate(value) {
  if (value === undefined || value === null || value === "") return null;
  const d = typeof value === "number" ? new Date(value) : new Date(String(value));
  return Number.isNaN(d.getTime()) ? null : d;
}

export function formatDateTime(value) {
  const d = toDate(value);
  if (!d) return "";
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function formatDay(value) {
  const d = toDate(value);
  if (!d) return "Undated";
  return d.toLocaleDateString(undefined, { weekday: "short", year: "numeric", month: "long", day: "numeric" });
}

/** <time> element with a machine-readable datetime. */
export function timeEl(value, day = false) {
  const d = toDate(value);
  if (!d) return h("span", { class: "muted" }, "unknown time");
  return h("time", { datetime: d.toISOString() }, day ? formatDay(d) : formatDateTime(d));
}

export function shortHash(hex, n = 12) {
  if (!hex) return "";
  return hex.length > n ? `${hex.slice(0, n)}…` : hex;
}

/** Move focus to the view's heading so keyboard and screen-reader users land there. */
export function focusHeading(root) {
  const heading = root.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: false });
  }
}

/** A button that runs an async action, disabled while it runs. */
export function actionButton(label, action, attrs = {}) {
  const btn = h("button", { type: "button", ...attrs }, label);
  btn.addEventListener("click", async () => {
    if (btn.disabled) return;
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    try {
      await action(btn);
    } finally {
      btn.disabled = false;
      btn.removeAttribute("aria-busy");
    }
  });
  return btn;
}
