// The shared document: a durable room (`doc:demo`) whose messages are edits
// (add a line, remove a line). Whoever joins, however late, rebuilds the
// document by replaying the room's history from offset 0 and then applies
// live edits; every edit is applied once, in offset order, so every tab
// shows the same document. Live cursors travel in presence meta.
const $ = (id) => document.getElementById(id);

const ROOM = "doc:demo";
/** Presence updates are rate limited (10 a second): cursors go out at most this often. */
const CURSOR_EVERY_MS = 150;
const PAGE = 500;

export async function startDoc(herald, me) {
  const room = herald.room(new URLSearchParams(location.search).get("doc") ?? ROOM);
  /** id -> { text, by }; insertion order is document order. */
  const lines = new Map();
  let epoch = "";
  /** The last offset applied: each edit is applied once. */
  let applied = 0;
  let replaying = true;
  const early = [];

  function apply(m) {
    if ((m.epoch ?? epoch) !== epoch || !(m.offset > applied)) return;
    applied = m.offset;
    const op = m.data ?? {};
    if (op.t === "add" && typeof op.id === "string") {
      lines.set(op.id, { text: String(op.text ?? ""), by: m.from });
    } else if (op.t === "remove") {
      lines.delete(op.id);
    }
  }

  function render() {
    const list = $("lines");
    list.replaceChildren();
    for (const [id, { text, by }] of lines) {
      const li = document.createElement("li");
      li.dataset.id = id;
      li.dataset.testid = "doc-line";
      const t = document.createElement("span");
      t.className = "line-text";
      t.textContent = text;
      const who = document.createElement("span");
      who.className = "by";
      who.textContent = by;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.title = "Remove this line";
      remove.textContent = "×";
      remove.addEventListener("click", () => room.publish({ t: "remove", id }).catch(() => {}));
      li.append(t, who, remove);
      list.append(li);
    }
    $("page").dataset.offset = String(applied);
  }

  room.on("message", (m) => {
    if (replaying) early.push(m);
    else {
      apply(m);
      render();
    }
  });

  const joined = await room.join({ meta: { name: me } });
  epoch = joined.epoch;
  // Replay the document from its first edit, page by page, up to where the
  // join left off; live edits that came meanwhile wait in `early`.
  let since = { epoch, offset: 0 };
  while (since.offset < joined.offset) {
    const page = await room.history({ since, limit: PAGE });
    page.messages.forEach(apply);
    const last = page.messages.at(-1);
    if (!last || page.messages.length < PAGE) break;
    since = { epoch, offset: last.offset };
  }
  replaying = false;
  early.sort((a, b) => a.offset - b.offset).forEach(apply);
  render();

  $("doc-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("doc-text").value.trim();
    if (!text) return;
    $("doc-text").value = "";
    const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    room.publish({ t: "add", id, text }).catch(() => {});
  });

  startCursors(herald, room, me);
}

/** Everyone's pointer over the page, as a fraction of its size. */
function startCursors(herald, room, me) {
  const page = $("page");
  /** conn -> element */
  const shown = new Map();

  function show(conn, user, meta) {
    let el = shown.get(conn);
    const cursor = meta?.cursor;
    if (conn === herald.conn || !cursor) {
      el?.remove();
      shown.delete(conn);
      return;
    }
    if (!el) {
      el = document.createElement("div");
      el.className = "cursor";
      el.dataset.user = user;
      const label = document.createElement("span");
      label.textContent = user;
      label.style.background = colour(user);
      el.style.color = colour(user);
      el.append(label);
      $("cursors").append(el);
      shown.set(conn, el);
    }
    el.style.left = `${cursor.x * 100}%`;
    el.style.top = `${cursor.y * 100}%`;
  }

  room.on("presence", (p) => {
    if (p.event === "leave") show(p.conn, p.user, null);
    else show(p.conn, p.user, p.meta);
  });
  room.presence().then((members) => {
    for (const m of members) for (const c of m.connections ?? []) show(c.conn, m.user, c.meta);
  }, () => {});

  let last = 0;
  let pending = null;
  let timer = 0;
  function send(cursor) {
    pending = cursor;
    const wait = last + CURSOR_EVERY_MS - Date.now();
    if (timer) return;
    timer = setTimeout(() => {
      timer = 0;
      last = Date.now();
      room.setMeta({ name: me, cursor: pending }).catch(() => {});
    }, Math.max(0, wait));
  }
  page.addEventListener("pointermove", (e) => {
    const r = page.getBoundingClientRect();
    const round = (v) => Math.round(Math.min(1, Math.max(0, v)) * 1000) / 1000;
    send({ x: round((e.clientX - r.left) / r.width), y: round((e.clientY - r.top) / r.height) });
  });
  page.addEventListener("pointerleave", () => send(null));
}

function colour(user) {
  let h = 0;
  for (const ch of user) h = (h * 31 + ch.codePointAt(0)) % 360;
  return `hsl(${h} 65% 42%)`;
}
