// Awaiting the SDK's events in tests: the next event that matches, or every
// message of a room gathered for later checks.

import { eventually } from "./servers.js";

/** The next `ev` from `target` (a Herald or a Room) for which `pred` holds. */
export function nextEvent(target, ev, pred = () => true, timeoutMs = 15_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${ev} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = target.on(ev, (v) => {
      if (!pred(v)) return;
      clearTimeout(timer);
      off();
      resolve(v);
    });
  });
}

/** Every message `room` delivers from now on; `await got.count(n)` waits for n of them. */
export function collect(room) {
  const messages = [];
  room.on("message", (m) => messages.push(m));
  messages.count = (n, timeoutMs = 15_000) =>
    eventually(`${room.name}: ${n} messages (have ${messages.length})`, () => messages.length >= n, timeoutMs);
  return messages;
}
