// Reconnect delays: exponential backoff with full jitter, so that thousands
// of clients cut off by one failed edge come back spread over the whole
// window instead of in synchronized waves.

export interface BackoffOptions {
  initialDelayMs: number;
  maxDelayMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initialDelayMs: 500, maxDelayMs: 15_000 };

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a
 * loss): uniform in [0, min(max, initial * 2^attempt)). `random` is
 * injectable for tests.
 */
export function backoffDelay(
  attempt: number,
  opts: BackoffOptions = DEFAULT_BACKOFF,
  random: () => number = Math.random,
): number {
  const initial = Math.max(1, opts.initialDelayMs);
  const max = Math.max(initial, opts.maxDelayMs);
  // Past 2^30 the product only overflows towards Infinity; the cap is hit long before.
  const cap = Math.min(max, initial * 2 ** Math.min(Math.max(0, attempt), 30));
  return Math.floor(random() * cap);
}

/**
 * The wait before the next attempt: the backoff, but never less than what
 * the server asked for (`disconnect.reconnect_after_ms`, e.g. a draining edge
 * spreading its clients out, or a rate-limit close).
 */
export function reconnectDelay(
  attempt: number,
  serverHintMs: number | undefined,
  opts: BackoffOptions = DEFAULT_BACKOFF,
  random: () => number = Math.random,
): number {
  const jittered = backoffDelay(attempt, opts, random);
  return serverHintMs !== undefined && serverHintMs > jittered ? serverHintMs : jittered;
}
