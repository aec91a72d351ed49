// A small CBOR (RFC 8949) decoder for medledger's data model: unsigned and negative
// integers, byte strings (returned as Uint8Array), text, arrays, text-keyed maps,
// false/true/null. Used to read a verified transaction's own bytes, so what the
// page shows next to a "verified" mark comes from the proven entry itself.

export class CborError extends Error {}

const dec = new TextDecoder("utf-8", { fatal: true });

export function decodeCbor(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;

  function need(n) {
    if (pos + n > bytes.length) throw new CborError("truncated CBOR");
  }

  function arg(info) {
    if (info < 24) return info;
    if (info === 24) { need(1); return view.getUint8(pos++); }
    if (info === 25) { need(2); const v = view.getUint16(pos); pos += 2; return v; }
    if (info === 26) { need(4); const v = view.getUint32(pos); pos += 4; return v; }
    if (info === 27) {
      need(8);
      const v = view.getBigUint64(pos);
      pos += 8;
      return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
    }
    throw new CborError("indefinite lengths are not canonical");
  }

  function item(depth) {
    if (depth > 64) throw new CborError("CBOR nested too deeply");
    need(1);
    const head = bytes[pos++];
    const major = head >> 5;
    const info = head & 31;
    if (major === 7) {
      if (info === 20) return false;
      if (info === 21) return true;
      if (info === 22) return null;
      throw new CborError("unsupported simple value or float");
    }
    const n = arg(info);
    switch (major) {
      case 0: return n;
      case 1: return typeof n === "bigint" ? -1n - n : -1 - n;
      case 2: { need(n); const b = bytes.slice(pos, pos + n); pos += n; return b; }
      case 3: { need(n); const s = dec.decode(bytes.subarray(pos, pos + n)); pos += n; return s; }
      case 4: { const a = []; for (let i = 0; i < n; i++) a.push(item(depth + 1)); return a; }
      case 5: {
        const m = {};
        for (let i = 0; i < n; i++) {
          const k = item(depth + 1);
          if (typeof k !== "string") throw new CborError("map keys must be text");
          m[k] = item(depth + 1);
        }
        return m;
      }
      default: throw new CborError("CBOR tags are not used by medledger");
    }
  }

  const value = item(0);
  if (pos !== bytes.length) throw new CborError("trailing bytes after CBOR item");
  return value;
}
