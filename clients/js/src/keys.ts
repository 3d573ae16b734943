// Idempotency keys for publishes: random, so that a publish retried after a
// reconnect is recognised by a durable room as the one it already stored.
// `crypto.randomUUID` exists only in secure contexts (https, localhost), so
// the key is built from `getRandomValues`, which every browser has.

export function newKey(): string {
  const bytes = new Uint8Array(16);
  const c = (globalThis as { crypto?: { getRandomValues?: (a: Uint8Array) => Uint8Array } }).crypto;
  if (c?.getRandomValues) {
    c.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}
