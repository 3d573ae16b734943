// Notifications: the user's personal room (`user:<name>`), where
// `Router.SendToUser` puts messages even while the user is away. The badge
// shows the room's unread count as the server keeps it (`connected.unread`,
// then `read` events from any of the user's tabs); "Mark all read" moves the
// read marker, which clears the badge in every tab.
const $ = (id) => document.getElementById(id);

// Called before the first connect, so that the inbox messages the server
// delivers right after `connected` are not missed: `herald.room(name)` is
// the same object as `herald.personal`.
export function startInbox(herald, me) {
  const room = `user:${me}`;
  const personal = herald.room(room);

  function renderBadge() {
    const n = herald.unread(room);
    const badge = $("badge");
    badge.dataset.count = String(n);
    badge.textContent = String(n);
    badge.hidden = n === 0;
    // Newest first: the first `n` are the unread ones.
    [...$("notes").children].forEach((li, i) => li.classList.toggle("unread", i < n));
  }

  personal.on("message", (m) => {
    const li = document.createElement("li");
    li.dataset.testid = "note";
    li.dataset.offset = String(m.offset ?? 0);
    li.textContent = typeof m.data?.text === "string" ? m.data.text : JSON.stringify(m.data);
    $("notes").prepend(li);
    // After the SDK's own handlers have counted it as unread.
    queueMicrotask(renderBadge);
  });
  personal.on("read", renderBadge);
  herald.on("connected", renderBadge);

  $("notify-me").addEventListener("click", async () => {
    const text = `Hello ${me}, it is ${new Date().toLocaleTimeString()}`;
    const res = await fetch(`/dev/notify?user=${encodeURIComponent(me)}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text }),
    });
    $("inbox-error").textContent = res.ok ? "" : (await res.text()).trim();
  });
  $("mark-read").addEventListener("click", async () => {
    const offset = personal.position?.offset;
    if (offset) await personal.markRead(offset);
    renderBadge();
  });

  renderBadge();
}
