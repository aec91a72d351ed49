// Ledger explorer: the signed checkpoint and its co-signatures (checked in the
// browser), consistency with the checkpoint this browser saw last, full ledger
// verification, blocks, transactions and their inclusion proofs.

import { ApiError, getSession, orgName, request } from "./api.js";
import { actionButton, announce, badge, h, notice, replace, shortHash, showError, timeEl } from "./ui.js";
import { b64decodeStrict, hexToBytes, parseVerifierKey, splitNote, verifyCheckpoint, verifyConsistency, verifyEntry, VerifyError } from "./verify.js";

const LAST_SEEN = "medledger.lastCheckpoint";

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function mono(text) {
  return h("code", {}, text);
}

/** Check each signature line of a note on its own, for display. */
async function signatureResults(note, verifierKeys) {
  const { text, sigs } = splitNote(note);
  const keys = [];
  for (const vk of verifierKeys) keys.push(await parseVerifierKey(vk));
  const msg = new TextEncoder().encode(text);
  const out = [];
  for (const s of sigs) {
    const key = keys.find((k) => k.name === s.name && k.keyHash.every((b, i) => b === s.keyHash[i]));
    let valid = false;
    if (key && s.signature.length === 64) valid = await crypto.subtle.verify({ name: "Ed25519" }, key.cryptoKey, s.signature, msg);
    out.push({ name: s.name, known: Boolean(key), valid });
  }
  return out;
}

async function consistencyCheck(cp, verified) {
  let last = null;
  try {
    last = JSON.parse(localStorage.getItem(LAST_SEEN) || "null");
  } catch {
    last = null;
  }
  const current = { origin: verified.origin, size: Number(verified.size), root: cp.root };
  const remember = () => localStorage.setItem(LAST_SEEN, JSON.stringify(current));
  if (!last || last.origin !== current.origin) {
    remember();
    return notice("", "This is the first checkpoint of this ledger your browser has seen; it is remembered so later visits can check that the log only grew.");
  }
  if (last.size > current.size) {
    return notice("bad", h("strong", {}, "Warning: "), `this checkpoint (size ${current.size}) is older than one your browser saw before (size ${last.size}).`);
  }
  try {
    const proof = await request(`/api/ledger/consistency?first=${last.size}&second=${current.size}`, { auth: false });
    await verifyConsistency(last.size, current.size, proof.proof, hexToBytes(last.root), hexToBytes(current.root));
    remember();
    return h("div", { class: "notice ok", "data-testid": "consistency" }, "✓ Append-only: ",
      last.size === current.size ? "the log is unchanged since your last visit." : `the log grew from ${last.size} to ${current.size} entries without changing any earlier entry (consistency proof checked in your browser).`);
  } catch (e) {
    return notice("bad", h("strong", {}, "Consistency check failed: "), e.message);
  }
}

async function checkpointCard() {
  const card = h("section", { class: "card", "aria-labelledby": "cp-title" });
  card.append(h("h2", { id: "cp-title" }, "Latest signed checkpoint"));
  const cp = await request("/api/ledger/checkpoint", { auth: false });
  const rootB64 = cp.note.split("\n")[2];
  let verified = null;
  let verdict;
  try {
    verified = await verifyCheckpoint(cp.note, cp.verifier_keys);
    const root = b64decodeStrict(rootB64);
    if (!root || Array.from(root, (b) => b.toString(16).padStart(2, "0")).join("") !== cp.root) throw new VerifyError("the note's root differs from the one reported");
    verdict = h("p", { "data-testid": "checkpoint-verdict" }, badge("✓ Signatures verified in your browser", "verified"));
  } catch (e) {
    verdict = h("p", { "data-testid": "checkpoint-verdict" }, badge("✗ Not verified", "unverified"), ` ${e.message}`);
  }
  let sigs = [];
  try {
    sigs = await signatureResults(cp.note, cp.verifier_keys);
  } catch {
    sigs = [];
  }
  card.append(verdict,
    kv([
      ["Log", mono(cp.origin)],
      ["Entries", String(cp.size)],
      ["Root hash", mono(cp.root)],
      ["Block", cp.block ? h("a", { href: `#/explorer/block/${cp.block.height}` }, `#${cp.block.height}`) : "—"],
    ]),
    h("h3", {}, "Co-signatures"),
    h("ul", { class: "list", "data-testid": "cosignatures" }, sigs.map((s) => h("li", { class: "item" },
      h("div", { class: "item-head" },
        h("span", { class: "item-title" }, orgName(s.name.split("/").pop()), " ", h("span", { class: "muted small" }, s.name)),
        !s.known ? badge("unknown key", "pending") : s.valid ? badge("✓ valid", "verified") : badge("✗ invalid", "unverified")))),
    ),
    h("details", {}, h("summary", {}, "Signed note (C2SP) and verifier keys"),
      h("pre", {}, cp.note), h("pre", {}, cp.verifier_keys.join("\n"))));
  if (verified) card.append(await consistencyCheck(cp, verified));
  return card;
}

function verifyCard() {
  const card = h("section", { class: "card", "aria-labelledby": "verify-title" });
  const out = h("div", { "aria-live": "polite", "data-testid": "verify-result" });
  card.append(h("h2", { id: "verify-title" }, "Verify the whole ledger"),
    h("p", { class: "muted small" }, "The node replays every block from genesis: transaction and block signatures, the Merkle log, the state tree and every checkpoint."),
    actionButton("Run verify", async () => {
      replace(out, h("p", { class: "muted" }, "Verifying…"));
      try {
        const r = await request("/api/ledger/verify");
        if (r.ok) {
          replace(out, notice("ok", h("strong", {}, "✓ Ledger verified: "), `${r.blocks} blocks, ${r.transactions} transactions, ${r.checkpoints} checkpoints; log root `, mono(shortHash(r.log_root, 16))));
        } else {
          const f = r.failure || {};
          replace(out, notice("bad", h("strong", {}, "✗ Verification failed: "), f.message || "", f.height !== null && f.height !== undefined ? ` (block ${f.height}${f.index !== null && f.index !== undefined ? `, tx #${f.index}` : ""})` : ""));
        }
        announce(r.ok ? "Ledger verified." : "Ledger verification failed.");
      } catch (e) {
        replace(out);
        showError(`Verify failed: ${e.message}`);
      }
    }, { id: "run-verify" }),
    out);
  return card;
}

async function blocksCard(start) {
  const card = h("section", { class: "card", "aria-labelledby": "blocks-title" });
  card.append(h("h2", { id: "blocks-title" }, "Blocks"));
  const body = h("div", {});
  card.append(body);
  async function load(from) {
    const q = from === null ? "" : `?start=${from}&limit=20`;
    const page = await request(`/api/ledger/blocks${q}`);
    const rows = page.blocks.map((b) => h("tr", {},
      h("td", {}, h("a", { href: `#/explorer/block/${b.height}` }, `#${b.height}`)),
      h("td", {}, timeEl(b.time)),
      h("td", {}, String(b.count)),
      h("td", { class: "hide-narrow" }, orgName(b.proposer_org) || "genesis"),
      h("td", { class: "hide-narrow" }, mono(shortHash(b.hash)))));
    const lowest = page.blocks.length ? page.blocks[page.blocks.length - 1].height : 0;
    const highest = page.blocks.length ? page.blocks[0].height : 0;
    const nav = h("div", { class: "actions" });
    if (lowest > 0) nav.append(actionButton("Older blocks", () => load(Math.max(0, lowest - 20)), { class: "secondary" }));
    if (highest < page.head) nav.append(actionButton("Newer blocks", () => load(Math.min(page.head, highest + 1)), { class: "secondary" }));
    replace(body,
      h("div", { class: "table-wrap", "data-testid": "blocks" }, h("table", {},
        h("caption", { class: "visually-hidden" }, "Blocks, newest first"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Height"), h("th", { scope: "col" }, "Time"), h("th", { scope: "col" }, "Transactions"),
          h("th", { scope: "col", class: "hide-narrow" }, "Proposer"), h("th", { scope: "col", class: "hide-narrow" }, "Hash"))),
        h("tbody", {}, rows))),
      nav);
  }
  await load(start);
  return card;
}

function lookupForm() {
  const id = "lookup";
  const input = h("input", { id, name: "q", autocomplete: "off", spellcheck: "false", placeholder: "block height or transaction id" });
  const form = h("form", { role: "search", "aria-label": "Find a block or transaction", class: "field-row" },
    h("div", { class: "field" }, h("label", { for: id }, "Block height or transaction id"), input),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Go")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = input.value.trim();
    if (/^\d{1,15}$/.test(q)) location.hash = `#/explorer/block/${q}`;
    else if (/^[0-9a-fA-F]{64}$/.test(q)) location.hash = `#/explorer/tx/${q.toLowerCase()}`;
    else showError("Enter a block height (a number) or a 64-digit transaction id.");
  });
  return form;
}

export async function explorerHome(root) {
  root.append(h("h1", {}, "Ledger explorer"),
    h("p", { class: "muted" }, "The ledger is an append-only log of signed transactions, grouped into blocks and checkpointed by every member organisation. Your browser checks the checkpoint's signatures and proofs itself."));
  root.append(await checkpointCard());
  if (!getSession()) {
    root.append(notice("", h("a", { href: "#/signin" }, "Sign in"), " to browse blocks and transactions and to run a full verification."));
    return;
  }
  root.append(lookupForm(), verifyCard(), await blocksCard(null));
}

export async function explorerBlock(root, height) {
  root.append(h("h1", {}, `Block #${height}`), h("p", {}, h("a", { href: "#/explorer" }, "← Ledger explorer")));
  if (!getSession()) {
    root.append(notice("", h("a", { href: "#/signin" }, "Sign in"), " to see blocks."));
    return;
  }
  let b;
  try {
    b = await request(`/api/ledger/blocks/${height}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      root.append(notice("", "There is no such block."));
      return;
    }
    throw e;
  }
  root.append(h("section", { class: "card" },
    kv([
      ["Time", timeEl(b.time)],
      ["Hash", mono(b.hash)],
      ["Previous", b.height > 0 ? h("a", { href: `#/explorer/block/${b.height - 1}` }, mono(shortHash(b.prev, 24))) : "—"],
      ["Proposer", b.proposer_org ? orgName(b.proposer_org) : "genesis"],
      ["Proposer signature", b.sig_verified === null || b.sig_verified === undefined ? "—" : b.sig_verified ? badge("✓ valid", "verified") : badge("✗ invalid", "unverified")],
      ["Log entries", `${b.first} – ${b.first + b.count - 1} (log size ${b.log_size})`],
      ["Log root", mono(b.log_root)],
      ["State root", mono(b.state_root)],
    ]),
    b.checkpoint ? h("details", {}, h("summary", {}, "Checkpoint signed at this block"), h("pre", {}, b.checkpoint)) : null));
  root.append(h("h2", {}, `Transactions (${b.count})`));
  if (b.txs_truncated) root.append(notice("", `The first ${b.txs.length} are listed.`));
  if (!b.txs.length) root.append(h("p", { class: "muted" }, "No transactions (genesis)."));
  else {
    root.append(h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "#"), h("th", { scope: "col" }, "Type"), h("th", { scope: "col" }, "Signed by"), h("th", { scope: "col", class: "hide-narrow" }, "Id"))),
      h("tbody", {}, b.txs.map((t) => h("tr", {},
        h("td", {}, String(t.index)),
        h("td", {}, h("a", { href: `#/explorer/tx/${t.tx_id}` }, t.type)),
        h("td", {}, t.signer_principal || mono(shortHash(t.signer))),
        h("td", { class: "hide-narrow" }, mono(shortHash(t.tx_id)))))))));
  }
}

export async function explorerTx(root, txId) {
  txId = txId.toLowerCase();
  root.append(h("h1", {}, "Transaction"), h("p", {}, h("a", { href: "#/explorer" }, "← Ledger explorer")));
  if (!getSession()) {
    root.append(notice("", h("a", { href: "#/signin" }, "Sign in"), " to see transactions."));
    return;
  }
  let tx;
  try {
    tx = await request(`/api/ledger/tx/${txId}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      root.append(notice("", "There is no such transaction."));
      return;
    }
    throw e;
  }
  root.append(h("section", { class: "card" }, kv([
    ["Id", mono(tx.tx_id)],
    ["Type", tx.type],
    ["Log index", String(tx.index)],
    ["Block", h("a", { href: `#/explorer/block/${tx.height}` }, `#${tx.height}`)],
    ["Signed by", tx.signer_principal || mono(tx.signer)],
    ["Time", timeEl(tx.time)],
  ]), tx.redacted ? notice("", "The content of this transaction is not about you, so it is not shown.") :
    h("details", { open: true }, h("summary", {}, "Payload"), h("pre", {}, JSON.stringify(tx.payload, null, 2)))));

  const out = h("div", { "aria-live": "polite", "data-testid": "inclusion-result" });
  const proofCard = h("section", { class: "card", "aria-labelledby": "proof-title" },
    h("h2", { id: "proof-title" }, "Inclusion proof"),
    h("p", { class: "muted small" }, "Proves this transaction is entry number " + tx.index + " of the log summarised by the latest signed checkpoint."),
    actionButton("Verify in this browser", async () => {
      replace(out, h("p", { class: "muted" }, "Checking…"));
      try {
        const [proof, cp] = await Promise.all([request(`/api/ledger/tx/${txId}/proof`), request("/api/ledger/checkpoint", { auth: false })]);
        if (!proof.canonical_bytes) throw new VerifyError("the transaction's bytes are not visible to you; only its proof path can be shown");
        const raw = b64decodeStrict(proof.canonical_bytes);
        if (!raw) throw new VerifyError("the transaction bytes are not valid base64");
        const r = await verifyEntry({ entryBytes: raw, txId, proof, verifierKeys: cp.verifier_keys });
        replace(out, notice("ok", h("strong", {}, "✓ Included: "), `entry ${r.leafIndex} of ${r.treeSize}, checkpoint signed by ${r.signers.map((n) => orgName(n.split("/").pop())).join(", ")}.`),
          h("details", {}, h("summary", {}, `Audit path (${proof.proof.length} hashes)`), h("ol", {}, proof.proof.map((p) => h("li", {}, mono(p))))));
        announce("Inclusion verified.");
      } catch (e) {
        replace(out, notice("bad", h("strong", {}, "✗ Not verified: "), e.message));
      }
    }, { id: "verify-inclusion" }),
    out);
  root.append(proofCard);
}
