// In-browser verification of medledger proofs, trusting nothing the server says
// beyond the verifier keys it is given.
//
// * RFC 9162 Merkle inclusion and consistency proofs (SHA-256 via WebCrypto;
//   leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right)),
//   ported from medledger.merkle.verify (the transparency-dev algorithm).
// * C2SP signed notes (https://c2sp.org/signed-note) with Ed25519 signatures and
//   C2SP tlog checkpoints (https://c2sp.org/tlog-checkpoint), mirroring
//   medledger.ledger.note and medledger.ledger.checkpoint.
// * verifyEntry(): the whole chain for one ledger entry — its canonical bytes
//   hash to its id, its leaf hash, the inclusion proof up to the root of a
//   checkpoint signed by known keys.
//
// Every check failure throws VerifyError; nothing here talks to the network.

export class VerifyError extends Error {
  constructor(message) {
    super(message);
    this.name = "VerifyError";
  }
}

const enc = new TextEncoder();

function subtle() {
  const s = globalThis.crypto && globalThis.crypto.subtle;
  if (!s) {
    throw new VerifyError(
      "this page is not a secure context (use https or localhost): WebCrypto is unavailable",
    );
  }
  return s;
}

// -- bytes ------------------------------------------------------------------------------

export function hexToBytes(hex) {
  if (typeof hex !== "string" || !/^(?:[0-9a-fA-F]{2})*$/.test(hex)) {
    throw new VerifyError("not a hex string");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Strict standard base64 (RFC 4648 section 4), padded and canonical; else null. */
export function b64decodeStrict(text) {
  if (typeof text !== "string" || !B64_RE.test(text)) return null;
  const bin = atob(text);
  const out = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  if (b64encode(out) !== text) return null; // non-zero trailing bits
  return out;
}

export function b64encode(bytes) {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function concat(...parts) {
  const len = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(len);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

export async function sha256(...parts) {
  return new Uint8Array(await subtle().digest("SHA-256", concat(...parts)));
}

// -- RFC 9162 Merkle proofs ---------------------------------------------------------------

const LEAF = new Uint8Array([0]);
const NODE = new Uint8Array([1]);
const HASH_SIZE = 32;

export const leafHash = (data) => sha256(LEAF, data);
export const nodeHash = (left, right) => sha256(NODE, left, right);

function big(value, what) {
  let v;
  if (typeof value === "bigint") v = value;
  else if (typeof value === "number" && Number.isSafeInteger(value)) v = BigInt(value);
  else if (typeof value === "string" && /^(0|[1-9][0-9]*)$/.test(value)) v = BigInt(value);
  else throw new VerifyError(`${what} must be a non-negative integer`);
  if (v < 0n || v >= 1n << 64n) throw new VerifyError(`${what} out of range`);
  return v;
}

function bitLength(v) {
  return v === 0n ? 0 : v.toString(2).length;
}

function bitCount(v) {
  let n = 0;
  for (const c of v.toString(2)) if (c === "1") n++;
  return n;
}

function hashList(proof) {
  if (!Array.isArray(proof)) throw new VerifyError("proof must be a list of hashes");
  return proof.map((h, i) => {
    const b = typeof h === "string" ? hexToBytes(h) : h;
    if (!(b instanceof Uint8Array) || b.length !== HASH_SIZE) {
      throw new VerifyError(`proof[${i}] is not a 32-byte hash`);
    }
    return b;
  });
}

function checkHash(h, what) {
  const b = typeof h === "string" ? hexToBytes(h) : h;
  if (!(b instanceof Uint8Array) || b.length !== HASH_SIZE) {
    throw new VerifyError(`${what} is not a 32-byte hash`);
  }
  return b;
}

function decompose(index, size) {
  const inner = bitLength(index ^ (size - 1n));
  const border = bitCount(index >> BigInt(inner));
  return [inner, border];
}

async function chainInner(seed, proof, index) {
  for (let i = 0; i < proof.length; i++) {
    seed = (index >> BigInt(i)) & 1n ? await nodeHash(proof[i], seed) : await nodeHash(seed, proof[i]);
  }
  return seed;
}

async function chainInnerRight(seed, proof, index) {
  for (let i = 0; i < proof.length; i++) {
    if ((index >> BigInt(i)) & 1n) seed = await nodeHash(proof[i], seed);
  }
  return seed;
}

async function chainBorderRight(seed, proof) {
  for (const h of proof) seed = await nodeHash(h, seed);
  return seed;
}

/** The root implied by an inclusion proof (RFC 9162 section 2.1.3.2). */
export async function rootFromInclusionProof(leafIndex, treeSize, leaf, proof) {
  const index = big(leafIndex, "leaf index");
  const size = big(treeSize, "tree size");
  if (index >= size) throw new VerifyError(`leaf index ${index} out of range for tree size ${size}`);
  const lh = checkHash(leaf, "leaf hash");
  const path = hashList(proof);
  const [inner, border] = decompose(index, size);
  if (path.length !== inner + border) {
    throw new VerifyError(`wrong inclusion proof size ${path.length}, want ${inner + border}`);
  }
  const h = await chainInner(lh, path.slice(0, inner), index);
  return chainBorderRight(h, path.slice(inner));
}

export async function verifyInclusion(leafIndex, treeSize, leaf, proof, root) {
  const calculated = await rootFromInclusionProof(leafIndex, treeSize, leaf, proof);
  if (!equal(calculated, checkHash(root, "root"))) {
    throw new VerifyError("inclusion proof does not lead to the checkpoint's root");
  }
}

/** RFC 9162 section 2.1.4.2: the tree (size2, root2) extends (size1, root1). */
export async function verifyConsistency(size1In, size2In, proof, root1In, root2In) {
  const size1 = big(size1In, "size1");
  const size2 = big(size2In, "size2");
  if (size1 > size2) throw new VerifyError("size1 is larger than size2");
  const root1 = checkHash(root1In, "root1");
  const root2 = checkHash(root2In, "root2");
  let path = hashList(proof || []);
  const empty = await sha256();
  if (size1 === size2) {
    if (path.length) throw new VerifyError("equal sizes need an empty proof");
    if (size1 === 0n && !equal(root1, empty)) throw new VerifyError("root1 is not the empty root");
    if (!equal(root1, root2)) throw new VerifyError("roots differ for equal sizes");
    return;
  }
  if (size1 === 0n) {
    if (path.length) throw new VerifyError("size1 == 0 needs an empty proof");
    if (!equal(root1, empty)) throw new VerifyError("root1 is not the empty root");
    return;
  }
  if (!path.length) throw new VerifyError("empty consistency proof");
  let [inner, border] = decompose(size1 - 1n, size2);
  const shift = bitLength(size1 & -size1) - 1;
  inner -= shift;
  let seed;
  let start;
  if (size1 === 1n << BigInt(shift)) {
    seed = root1;
    start = 0;
  } else {
    seed = path[0];
    start = 1;
  }
  if (path.length !== start + inner + border) {
    throw new VerifyError(`wrong consistency proof size ${path.length}, want ${start + inner + border}`);
  }
  path = path.slice(start);
  const mask = (size1 - 1n) >> BigInt(shift);
  let hash1 = await chainInnerRight(seed, path.slice(0, inner), mask);
  hash1 = await chainBorderRight(hash1, path.slice(inner));
  if (!equal(hash1, root1)) throw new VerifyError("consistency proof does not match root1");
  let hash2 = await chainInner(seed, path.slice(0, inner), mask);
  hash2 = await chainBorderRight(hash2, path.slice(inner));
  if (!equal(hash2, root2)) throw new VerifyError("consistency proof does not match root2");
}

// -- C2SP signed notes (Ed25519) ----------------------------------------------------------

const ALG_ED25519 = 0x01;
const SIG_PREFIX = "\u2014 ";
const MAX_SIGNATURES = 100;
const CONTROL_RE = /[\x00-\x09\x0b-\x1f]/;
const SPACE_RE = /[\s\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]/u;

function validKeyName(name) {
  return typeof name === "string" && name.length > 0 && !name.includes("+") &&
    !SPACE_RE.test(name) && !CONTROL_RE.test(name);
}

async function keyHash(name, publicKey) {
  const h = await sha256(enc.encode(name), enc.encode("\n"), new Uint8Array([ALG_ED25519]), publicKey);
  return h.slice(0, 4);
}

/**
 * Parse a C2SP verifier key `<name>+<8 hex key hash>+<base64(0x01 || key)>`; checks
 * the key hash. Returns {name, keyHash, publicKey, cryptoKey}.
 */
export async function parseVerifierKey(vkey) {
  if (typeof vkey !== "string") throw new VerifyError("verifier key must be a string");
  // name+hash+key: the base64 key may itself contain "+", so split at the first two only
  const first = vkey.indexOf("+");
  const second = first < 0 ? -1 : vkey.indexOf("+", first + 1);
  const parts = second < 0 ? [] : [vkey.slice(0, first), vkey.slice(first + 1, second), vkey.slice(second + 1)];
  if (parts.length !== 3 || !validKeyName(parts[0]) || !/^[0-9a-fA-F]{8}$/.test(parts[1])) {
    throw new VerifyError("malformed verifier key");
  }
  const raw = b64decodeStrict(parts[2]);
  if (!raw || raw.length !== 33 || raw[0] !== ALG_ED25519) {
    throw new VerifyError("verifier key is not an Ed25519 key");
  }
  const publicKey = raw.slice(1);
  const kh = await keyHash(parts[0], publicKey);
  if (!equal(kh, hexToBytes(parts[1]))) throw new VerifyError("verifier key hash does not match");
  let cryptoKey;
  try {
    cryptoKey = await subtle().importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    throw new VerifyError(`this browser cannot import Ed25519 keys (${e.message})`);
  }
  return { name: parts[0], keyHash: kh, publicKey, cryptoKey, text: vkey };
}

/** Split a signed note into its text and parsed signature lines (no signature checks). */
export function splitNote(note) {
  if (typeof note !== "string") throw new VerifyError("a note is text");
  if (CONTROL_RE.test(note)) throw new VerifyError("malformed note: control character");
  const split = note.lastIndexOf("\n\n");
  if (split < 0) throw new VerifyError("malformed note: no empty line before the signatures");
  const text = note.slice(0, split + 1);
  const block = note.slice(split + 2);
  if (!block || !block.endsWith("\n")) throw new VerifyError("malformed note: signatures must end in a newline");
  const lines = block.slice(0, -1).split("\n");
  if (lines.length > MAX_SIGNATURES) throw new VerifyError("malformed note: too many signatures");
  const sigs = lines.map((line) => {
    if (!line.startsWith(SIG_PREFIX)) throw new VerifyError("malformed note: bad signature line");
    const rest = line.slice(SIG_PREFIX.length);
    const sp = rest.indexOf(" ");
    const name = sp < 0 ? rest : rest.slice(0, sp);
    const raw = sp < 0 ? null : b64decodeStrict(rest.slice(sp + 1));
    if (!validKeyName(name) || !raw || raw.length <= 4) {
      throw new VerifyError("malformed note: bad signature line");
    }
    return { line, name, keyHash: raw.slice(0, 4), signature: raw.slice(4) };
  });
  return { text, sigs };
}

/**
 * Open a signed note with known verifier keys (parsed with parseVerifierKey).
 * Every signature line of a known key must verify; at least one must exist.
 * Returns {text, verified: [names], unknown: [names]}.
 */
export async function openNote(note, verifiers) {
  const { text, sigs } = splitNote(note);
  const msg = enc.encode(text);
  const verified = [];
  const unknown = [];
  for (const sig of sigs) {
    const key = verifiers.find((v) => v.name === sig.name && equal(v.keyHash, sig.keyHash));
    if (!key) {
      unknown.push(sig.name);
      continue;
    }
    let ok = false;
    if (sig.signature.length === 64) {
      ok = await subtle().verify({ name: "Ed25519" }, key.cryptoKey, sig.signature, msg);
    }
    if (!ok) throw new VerifyError(`invalid signature by ${sig.name}`);
    if (!verified.includes(sig.name)) verified.push(sig.name);
  }
  if (!verified.length) throw new VerifyError("the checkpoint carries no signature from a known key");
  return { text, verified, unknown };
}

const DECIMAL_RE = /^(0|[1-9][0-9]*)$/;

/** Parse a checkpoint body: origin, size, root and extension lines (strict). */
export function parseCheckpoint(text) {
  if (!text.endsWith("\n")) throw new VerifyError("checkpoint must end in a newline");
  const lines = text.slice(0, -1).split("\n");
  if (lines.length < 3 || lines.some((l) => !l)) throw new VerifyError("malformed checkpoint");
  const [origin, sizeText, rootText, ...extensions] = lines;
  if (!DECIMAL_RE.test(sizeText)) throw new VerifyError("checkpoint size is not decimal");
  const root = b64decodeStrict(rootText);
  if (!root || root.length !== HASH_SIZE) throw new VerifyError("checkpoint root is not a 32-byte hash");
  const out = { origin, size: big(sizeText, "tree size"), root, extensions, block: null };
  for (const ext of extensions) {
    const p = ext.split(" ");
    if (p[0] !== "medledger-block") continue;
    if (out.block) throw new VerifyError("more than one medledger-block line");
    const hash = p.length === 4 ? b64decodeStrict(p[2]) : null;
    const state = p.length === 4 ? b64decodeStrict(p[3]) : null;
    if (!DECIMAL_RE.test(p[1] || "") || !hash || hash.length !== HASH_SIZE || !state || state.length !== HASH_SIZE) {
      throw new VerifyError("malformed medledger-block line");
    }
    out.block = { height: Number(big(p[1], "block height")), hash: bytesToHex(hash), stateRoot: bytesToHex(state) };
  }
  return out;
}

// Verified checkpoints, keyed by note and keys: the same inputs always give the same
// verdict, and a page checking many entries usually sees one or two checkpoints.
const checkpointCache = new Map();

/** Verify a signed checkpoint note against verifier key strings; returns the checkpoint. */
export async function verifyCheckpoint(note, verifierKeys, options = {}) {
  const key = JSON.stringify([note, verifierKeys, options.quorum || 1, options.origin || null]);
  if (!checkpointCache.has(key)) {
    if (checkpointCache.size > 64) checkpointCache.clear();
    const pending = verifyCheckpointUncached(note, verifierKeys, options);
    checkpointCache.set(key, pending);
    pending.catch(() => checkpointCache.delete(key));
  }
  return checkpointCache.get(key);
}

async function verifyCheckpointUncached(note, verifierKeys, { quorum = 1, origin = null } = {}) {
  const verifiers = [];
  for (const vk of verifierKeys) verifiers.push(await parseVerifierKey(vk));
  const opened = await openNote(note, verifiers);
  if (opened.verified.length < quorum) {
    throw new VerifyError(`checkpoint has ${opened.verified.length} of ${quorum} required signatures`);
  }
  const cp = parseCheckpoint(opened.text);
  if (origin !== null && cp.origin !== origin) throw new VerifyError("checkpoint origin is not this ledger's");
  return { ...cp, signers: opened.verified, unknownSigners: opened.unknown };
}

// -- one ledger entry, end to end -----------------------------------------------------------

/**
 * Verify that `entryBytes` (the canonical transaction bytes) is in the ledger:
 *   SHA-256(bytes) == txId (when given), leaf hash == proof.leaf_hash,
 *   the inclusion proof leads to the root of proof.checkpoint, whose size equals
 *   proof.tree_size, and that checkpoint is signed by the known verifier keys.
 * `proof` is {leaf_index, tree_size, leaf_hash, proof: [hex], checkpoint}.
 * Returns {txId, leafIndex, treeSize, signers, origin, block}.
 */
export async function verifyEntry({ entryBytes, txId = null, proof, verifierKeys, quorum = 1, origin = null }) {
  if (!(entryBytes instanceof Uint8Array) || !entryBytes.length) {
    throw new VerifyError("no entry bytes to verify");
  }
  if (!proof || typeof proof !== "object") throw new VerifyError("no proof");
  const id = bytesToHex(await sha256(entryBytes));
  if (txId !== null && id !== String(txId).toLowerCase()) {
    throw new VerifyError("the entry's bytes do not hash to its id");
  }
  const leaf = await leafHash(entryBytes);
  if (proof.leaf_hash !== undefined && bytesToHex(leaf) !== String(proof.leaf_hash).toLowerCase()) {
    throw new VerifyError("the proof is for another leaf");
  }
  const cp = await verifyCheckpoint(proof.checkpoint, verifierKeys, { quorum, origin });
  if (big(proof.tree_size, "tree size") !== cp.size) {
    throw new VerifyError("the proof is not for the checkpoint's tree size");
  }
  await verifyInclusion(proof.leaf_index, cp.size, leaf, proof.proof, cp.root);
  return {
    txId: id,
    leafIndex: Number(proof.leaf_index),
    treeSize: Number(cp.size),
    signers: cp.signers,
    origin: cp.origin,
    block: cp.block,
  };
}
