// Client tokens as a customer's auth service would make them: HS256 JWTs
// signed with node:crypto, with the secret the test servers are started with.

import { createHmac } from "node:crypto";
import { SECRET } from "./servers.js";

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT with `claims`; `exp` defaults to an hour from now. */
export function tokenWith(claims, secret = SECRET) {
  const body = { ...claims };
  if (body.exp === undefined) body.exp = Math.floor(Date.now() / 1000) + 3600;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify(body));
  const sig = createHmac("sha256", secret).update(`${head}.${payload}`).digest();
  return `${head}.${payload}.${b64url(sig)}`;
}

/** A token for user `sub`, valid `ttlSeconds` (an hour by default). */
export function token(sub, ttlSeconds = 3600) {
  return tokenWith({ sub, exp: Math.floor(Date.now() / 1000) + ttlSeconds });
}
