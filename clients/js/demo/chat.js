// Chat rooms: messages, the member list (one line per user, however many
// tabs or devices they have open), and typing indicators carried in each
// connection's presence meta (`setMeta({typing})`), not in messages.
const $ = (id) => document.getElementById(id);

/** How long after the last keystroke a user stops "typing". */
const TYPING_IDLE_MS = 2500;

export async function startChat(herald, me) {
  let room = null;
  let unsubscribe = [];
  /** conn -> { user, meta }: every connection in the room. */
  let conns = new Map();
  let typing = false;
  let typingTimer = 0;

  function renderMembers() {
    const users = new Map();
    for (const { user, meta } of conns.values()) {
      const u = users.get(user) ?? { devices: 0, typing: false };
      u.devices += 1;
      u.typing ||= Boolean(meta?.typing);
      users.set(user, u);
    }
    const list = $("members");
    list.replaceChildren();
    for (const [user, u] of [...users].sort(([a], [b]) => a.localeCompare(b))) {
      const li = document.createElement("li");
      li.dataset.user = user;
      li.dataset.devices = String(u.devices);
      li.dataset.typing = String(u.typing);
      li.append(user === me ? `${user} (you)` : user);
      const devices = document.createElement("span");
      devices.className = "devices";
      devices.textContent = u.devices === 1 ? "1 device" : `${u.devices} devices`;
      li.append(devices);
      if (u.typing) {
        const t = document.createElement("span");
        t.className = "is-typing";
        t.textContent = "typing…";
        li.append(t);
      }
      list.append(li);
    }
    const others = [...users].filter(([user, u]) => u.typing && user !== me).map(([user]) => user);
    $("typing").textContent =
      others.length === 0 ? "" : `${others.join(", ")} ${others.length === 1 ? "is" : "are"} typing…`;
  }

  function addMessage(m) {
    const li = document.createElement("li");
    li.dataset.testid = "message";
    li.dataset.from = m.from;
    if (m.from === me) li.className = "mine";
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = m.from;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = typeof m.data?.text === "string" ? m.data.text : JSON.stringify(m.data);
    const time = document.createElement("time");
    time.className = "time";
    time.textContent = new Date(m.ts).toLocaleTimeString();
    li.append(from, text, time);
    $("messages").append(li);
    li.scrollIntoView({ block: "end" });
  }

  async function setTyping(on) {
    if (typing === on || !room) return;
    typing = on;
    // A lost update only leaves a stale indicator; the next one fixes it.
    await room.setMeta({ typing: on }).catch(() => {});
  }

  async function open(name) {
    if (room?.name === name) return;
    clearTimeout(typingTimer);
    typing = false;
    unsubscribe.forEach((off) => off());
    unsubscribe = [];
    if (room) await room.leave().catch(() => {});
    room = herald.room(name);
    conns = new Map();
    $("messages").replaceChildren();
    $("room-name").textContent = name;
    for (const b of document.querySelectorAll("#rooms button")) {
      b.setAttribute("aria-current", String(b.dataset.room === name));
    }
    unsubscribe.push(
      room.on("message", addMessage),
      room.on("presence", (p) => {
        if (p.event === "leave") conns.delete(p.conn);
        else conns.set(p.conn, { user: p.user, meta: p.meta ?? conns.get(p.conn)?.meta });
        renderMembers();
      }),
      // Back after a reconnect: the member list may have changed meanwhile.
      herald.on("connected", () => refreshMembers(room)),
    );
    await room.join({ meta: { typing: false } });
    await refreshMembers(room);
  }

  async function refreshMembers(r) {
    const members = await r.presence().catch(() => null);
    if (!members || r !== room) return;
    conns = new Map();
    for (const m of members) {
      for (const c of m.connections ?? []) conns.set(c.conn, { user: m.user, meta: c.meta });
    }
    renderMembers();
  }

  $("rooms").addEventListener("click", (e) => {
    const name = e.target.closest("button")?.dataset.room;
    if (name) open(name);
  });
  $("text").addEventListener("input", () => {
    clearTimeout(typingTimer);
    const on = $("text").value.length > 0;
    setTyping(on);
    if (on) typingTimer = setTimeout(() => setTyping(false), TYPING_IDLE_MS);
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    $("text").value = "";
    clearTimeout(typingTimer);
    setTyping(false);
    // Offline, the SDK queues it and sends it after the reconnect.
    room.publish({ text }).catch((err) => {
      $("typing").textContent = `Not sent: ${err.message}`;
    });
  });

  await open(new URLSearchParams(location.search).get("room") ?? "chat:lobby");
}
