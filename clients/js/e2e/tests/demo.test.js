// The demo page that `herald dev` serves, in a real browser against a real
// `herald dev`: a message's round trip, two users chatting with presence
// and typing, one user on several tabs, the durable document replayed to a
// late joiner, and the notifications badge fed by Router.SendToUser.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { launch, newPage } from "../support/browser.js";
import { startDev } from "../support/herald.js";
import { showingLogs, stopAll } from "../support/processes.js";

let dev;
let browser;

before(async () => {
  dev = await startDev();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await stopAll();
});

/** Each test in its own chat and document rooms: they share one herald dev. */
let rooms = 0;
function nextRooms() {
  rooms += 1;
  return { chat: `chat:e2e-${rooms}`, doc: `doc:e2e-${rooms}` };
}

/** Opens the demo as `name` and waits until its panels are live. */
async function openDemo(context, name, { chat, doc }, label = name) {
  const page = await newPage(context, label);
  const q = new URLSearchParams({ name, room: chat, doc });
  await page.goto(`${dev.url}/?${q}`);
  await page.waitForSelector('body[data-ready="true"]');
  return page;
}

function noProblems(...pages) {
  assert.deepEqual(pages.flatMap((p) => p.problems), [], "the pages logged errors");
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

/** The texts of the chat messages a page shows, with who sent them. */
function messages(page) {
  return page.$$eval("#messages li", (lis) =>
    lis.map((li) => `${li.dataset.from}: ${li.querySelector(".text").textContent}`),
  );
}

async function waitForMessage(page, from, text) {
  await page.waitForFunction(
    ([from, text]) => [...document.querySelectorAll("#messages li")].some(
      (li) => li.dataset.from === from && li.querySelector(".text").textContent === text,
    ),
    [from, text],
  );
}

test("a message goes from the demo page through herald dev and back", () => showingLogs(async () => {
  const context = await browser.newContext();
  const r = nextRooms();
  const page = await openDemo(context, "ann", r);
  assert.equal(await page.getAttribute("#state", "data-state"), "connected");
  await page.waitForSelector('#members li[data-user="ann"]');
  await say(page, "hello from the browser");
  await waitForMessage(page, "ann", "hello from the browser");
  assert.deepEqual(await messages(page), ["ann: hello from the browser"]);
  noProblems(page);
  await context.close();
}));

test("two users chat and see each other's presence and typing", () => showingLogs(async () => {
  const r = nextRooms();
  const alice = await browser.newContext();
  const bob = await browser.newContext();
  const a = await openDemo(alice, "alice", r);
  const b = await openDemo(bob, "bob", r);

  await a.waitForSelector('#members li[data-user="bob"][data-devices="1"]');
  await b.waitForSelector('#members li[data-user="alice"][data-devices="1"]');

  // Typing travels in presence meta: shown while bob types, gone once he sends.
  await b.locator("#text").pressSequentially("hi al");
  await a.waitForFunction(() =>
    document.querySelector('#members li[data-user="bob"]')?.dataset.typing === "true" &&
    document.getElementById("typing").textContent === "bob is typing…");
  await b.locator("#text").pressSequentially("ice");
  await b.click("#send");
  await waitForMessage(a, "bob", "hi alice");
  await a.waitForSelector('#members li[data-user="bob"][data-typing="false"]');
  assert.equal(await a.textContent("#typing"), "");

  await say(a, "hello bob");
  await waitForMessage(b, "alice", "hello bob");
  assert.deepEqual(await messages(a), ["bob: hi alice", "alice: hello bob"]);
  assert.deepEqual(await messages(b), ["bob: hi alice", "alice: hello bob"]);

  // A second tab of alice's: one user with two devices, not two users.
  const a2 = await openDemo(alice, "alice", r, "alice, tab 2");
  await b.waitForSelector('#members li[data-user="alice"][data-devices="2"]');
  assert.equal(await b.locator("#members li").count(), 2);
  await a2.close();
  await b.waitForSelector('#members li[data-user="alice"][data-devices="1"]');
  await a.close();
  await b.waitForSelector('#members li[data-user="alice"]', { state: "detached" });
  noProblems(a, b, a2);
  await alice.close();
  await bob.close();
}));

test("a late joiner replays the durable document and sees live edits and cursors", () => showingLogs(async () => {
  const r = nextRooms();
  const alice = await browser.newContext();
  const a = await openDemo(alice, "alice", r);
  for (const line of ["first line", "second line", "third line"]) {
    await a.fill("#doc-text", line);
    await a.click("#doc-add");
    await a.waitForSelector(`#lines li:has-text("${line}")`);
  }
  await a.hover('#lines li:has-text("second line")');
  await a.click('#lines li:has-text("second line") .remove');
  await a.waitForSelector('#lines li:has-text("second line")', { state: "detached" });

  // Carol comes later, in another browser: the edits are replayed in order.
  const carol = await browser.newContext();
  const c = await openDemo(carol, "carol", r);
  const lines = (p) => p.$$eval("#lines .line-text", (els) => els.map((e) => e.textContent));
  assert.deepEqual(await lines(c), ["first line", "third line"]);

  // Live from here on, and each edit once.
  await c.fill("#doc-text", "carol's line");
  await c.click("#doc-add");
  await a.waitForSelector('#lines li:has-text("carol\'s line")');
  assert.deepEqual(await lines(a), ["first line", "third line", "carol's line"]);
  assert.deepEqual(await lines(c), ["first line", "third line", "carol's line"]);

  // Alice's pointer over the page shows on carol's screen.
  const box = await a.locator("#page").boundingBox();
  await a.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await a.mouse.move(box.x + box.width / 2 + 10, box.y + box.height / 2 + 5);
  await c.waitForSelector('#cursors .cursor[data-user="alice"]');
  noProblems(a, c);
  await alice.close();
  await carol.close();
}));

test("the notifications badge counts what Router.SendToUser sends and clears on read", () => showingLogs(async () => {
  const r = nextRooms();
  const dave = await browser.newContext();
  const d1 = await openDemo(dave, "dave", r);
  const d2 = await openDemo(dave, "dave", r, "dave, tab 2");
  const badge = (p, n) => p.waitForSelector(`#badge[data-count="${n}"]`, { state: n === 0 ? "attached" : "visible" });
  await badge(d1, 0);
  assert.equal(await d1.isHidden("#badge"), true);

  await d1.click("#notify-me");
  await badge(d1, 1);
  const sent = await fetch(`${dev.url}/dev/notify?user=dave`, {
    method: "POST",
    body: JSON.stringify({ text: "your build passed" }),
  });
  assert.equal(sent.status, 200, await sent.text());
  await badge(d1, 2);
  await badge(d2, 2);
  await d1.waitForSelector('#notes li:has-text("your build passed")');

  // Read on one tab: the read marker clears the badge on every tab.
  await d1.click("#mark-read");
  await badge(d1, 0);
  await badge(d2, 0);
  assert.equal(await d2.isHidden("#badge"), true);

  // Sent while dave is away: waiting in his inbox when he comes back.
  await d1.close();
  await d2.close();
  const away = await fetch(`${dev.url}/dev/notify?user=dave`, {
    method: "POST",
    body: JSON.stringify({ text: "while you were away" }),
  });
  assert.equal(away.status, 200, await away.text());
  const d3 = await openDemo(dave, "dave", r, "dave, back");
  await badge(d3, 1);
  await d3.waitForSelector('#notes li.unread:has-text("while you were away")');
  noProblems(d1, d2, d3);
  await dave.close();
}));
