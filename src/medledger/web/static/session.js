// Automatic logoff (HIPAA 45 CFR 164.312(a)(2)(iii)): after a period without
// keyboard, pointer or touch activity the page discards the token and whatever
// it was showing, and returns to sign-in. A warning with a "Stay signed in"
// button appears shortly before.

import { getSession, persistSession } from "./api.js";

const ACTIVITY_EVENTS = ["keydown", "pointerdown", "wheel", "touchstart"];

/** Seconds of inactivity before logoff: the server's setting, shortened (never lengthened) by ?idle=N. */
export function idleSeconds() {
  const configured = Number(document.documentElement.dataset.idleTimeout) || 900;
  const param = Number(new URLSearchParams(location.search).get("idle"));
  if (Number.isFinite(param) && param > 0) return Math.max(2, Math.min(configured, param));
  return configured;
}

export function startIdleWatch(onLogoff) {
  const limitMs = idleSeconds() * 1000;
  const warnMs = Math.min(60000, Math.floor(limitMs / 4));
  const box = document.getElementById("idle-warning");
  const secs = document.getElementById("idle-seconds");
  const stay = document.getElementById("idle-stay");
  let lastStored = 0;
  let returnFocus = null;

  function touch() {
    const s = getSession();
    if (!s) return;
    const now = Date.now();
    s.lastActivity = now;
    if (now - lastStored > 5000) {
      lastStored = now;
      persistSession(s);
    }
    if (box && !box.hidden) {
      box.hidden = true;
      if (returnFocus && document.contains(returnFocus)) returnFocus.focus();
      returnFocus = null;
    }
  }

  for (const ev of ACTIVITY_EVENTS) document.addEventListener(ev, touch, { passive: true, capture: true });
  if (stay) stay.addEventListener("click", touch);

  function tick() {
    const s = getSession();
    if (!s) {
      if (box) box.hidden = true;
      return;
    }
    const idle = Date.now() - (s.lastActivity || 0);
    if (idle >= limitMs) {
      if (box) box.hidden = true;
      onLogoff("inactivity");
      return;
    }
    const left = limitMs - idle;
    if (box && left <= warnMs) {
      if (secs) secs.textContent = String(Math.ceil(left / 1000));
      if (box.hidden) {
        box.hidden = false;
        returnFocus = document.activeElement;
        if (stay) stay.focus();
      }
    }
  }

  tick();
  return setInterval(tick, 1000);
}
