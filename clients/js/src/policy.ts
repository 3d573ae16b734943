// The protocol's catalogue read from the client's side: what an `error`
// frame means (its code, and how long the server asks to wait), and whether
// a close is worth reconnecting after. Kept apart from the client so the
// rules can be tested without a socket.

/** The `disconnect` frame that precedes every server-initiated close. */
export interface DisconnectFrame {
  code: number;
  reason: string;
  reconnect: boolean;
  reconnect_after_ms?: number;
}

/** The parts of an `error` frame an application acts on. */
export interface ErrorParts {
  code: string;
  message: string;
  retryAfterMs?: number;
}

export function errorParts(frame: Record<string, unknown>): ErrorParts {
  const code = typeof frame.code === "string" && frame.code !== "" ? frame.code : "internal";
  const message =
    typeof frame.message === "string" && frame.message !== "" ? frame.message : `the server answered ${code}`;
  const retry = frame.retry_after_ms;
  return typeof retry === "number" && retry >= 0 ? { code, message, retryAfterMs: retry } : { code, message };
}

/** Codes after which the same request may succeed later (docs/protocol.md, "Error codes"). */
const RETRYABLE = new Set(["rate_limited", "unavailable", "outcome_unknown", "internal", "timeout"]);

export function isRetryable(code: string): boolean {
  return RETRYABLE.has(code);
}

/** Closes that end the session for good when the server sent no `disconnect` saying otherwise. */
const FINAL_CLOSES = new Set([1000, 1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003]);
/** The server's own 4xxx closes after which a client comes back. */
const RETRY_4XXX = new Set([4008, 4009, 4010]);

export interface CloseDecision {
  reconnect: boolean;
  /** The least wait the server asked for before reconnecting. */
  delayMs?: number;
  /** The token was refused or expired (4001): only a new token can help. */
  auth: boolean;
}

/**
 * Whether to reconnect after a close with `code` (and the `disconnect` frame
 * before it, if one came). The server's `reconnect` decides, except for 4001:
 * the server says "not with this token", so a client that can fetch a new one
 * (`canRenewToken`, i.e. it has `getToken`) tries again with it. Without a
 * `disconnect` frame (a network drop, a killed edge: 1006) the code decides.
 */
export function closeDecision(
  code: number,
  disconnect: DisconnectFrame | undefined,
  canRenewToken: boolean,
): CloseDecision {
  const effective = disconnect?.code ?? code;
  if (effective === 4001) return { reconnect: canRenewToken, auth: true };
  if (disconnect !== undefined) {
    const delay = disconnect.reconnect_after_ms;
    return typeof delay === "number" && delay > 0
      ? { reconnect: disconnect.reconnect === true, delayMs: delay, auth: false }
      : { reconnect: disconnect.reconnect === true, auth: false };
  }
  if (FINAL_CLOSES.has(effective)) return { reconnect: false, auth: false };
  if (effective >= 4000 && effective <= 4999) return { reconnect: RETRY_4XXX.has(effective), auth: false };
  return { reconnect: true, auth: false };
}
