// The demo's entry point: asks for a name, gets tokens from herald dev's
// /dev/token, connects the SDK and starts the chat, document and inbox
// panels. `?name=alice` skips the prompt; `?edges=ws://a/ws,ws://b/ws`
// connects to those edges instead of this server's.
import { Herald } from "/sdk/herald.js";
import { startChat } from "/demo/chat.js";
import { startDoc } from "/demo/doc.js";
import { startInbox } from "/demo/inbox.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

async function fetchToken(name) {
  const res = await fetch(`/dev/token?sub=${encodeURIComponent(name)}`);
  if (!res.ok) throw new Error((await res.text()).trim() || `HTTP ${res.status}`);
  return (await res.json()).token;
}

function edgeUrls() {
  const given = params.get("edges");
  if (given) return given.split(",").map((u) => u.trim()).filter(Boolean);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return [`${scheme}://${location.host}/ws`];
}

function showState(state, detail = "") {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = detail ? `${state} (${detail})` : state;
}

async function enter(name) {
  $("login-error").textContent = "";
  // Asked once up front, so that a refusal shows on the form.
  const first = await fetchToken(name);
  let token = first;
  const herald = new Herald(edgeUrls(), {
    // The first token is used once; every reconnect and refresh asks anew.
    getToken: () => {
      const t = token;
      token = undefined;
      return t ?? fetchToken(name);
    },
    client: { name: "herald-demo" },
  });
  // For the browser console and the browser tests.
  window.herald = herald;
  herald.on("connected", (c) => showState("connected", c.node));
  herald.on("disconnected", (d) => showState(d.willReconnect ? "reconnecting" : "closed", d.reason || String(d.code)));
  startInbox(herald, name);
  showState("connecting");
  await herald.connect();
  localStorage.setItem("herald-demo-name", name);
  $("me").textContent = name;
  $("login").hidden = true;
  $("app").hidden = false;
  $("inbox-toggle").hidden = false;
  await Promise.all([startChat(herald, name), startDoc(herald, name)]);
  document.body.dataset.ready = "true";
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  $("enter").disabled = true;
  enter(name).catch((err) => {
    $("login-error").textContent = `Could not connect: ${err.message}`;
    $("enter").disabled = false;
    showState("idle");
  });
});

$("inbox-toggle").addEventListener("click", () => $("inbox").scrollIntoView({ behavior: "smooth" }));

const remembered = params.get("name") ?? localStorage.getItem("herald-demo-name");
if (remembered) {
  $("name").value = remembered;
  if (params.has("name")) $("login").requestSubmit();
}
