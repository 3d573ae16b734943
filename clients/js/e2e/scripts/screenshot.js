// Takes docs/demo.png: the real demo on a real `herald dev`, two users
// chatting, seen from alice's tab (bob typing, bob's cursor on the shared
// document, a notification waiting). `npm run screenshot` in clients/js/e2e,
// after `cargo build --bin herald`.
import { resolve } from "node:path";
import { launch } from "../support/browser.js";
import { startDev } from "../support/herald.js";
import { REPO, stopAll } from "../support/processes.js";

const out = resolve(REPO, "docs/demo.png");
const dev = await startDev();
const browser = await launch();
try {
  const open = async (name) => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 650 }, deviceScaleFactor: 1 });
    const page = await context.newPage();
    await page.goto(`${dev.url}/?name=${name}`);
    await page.waitForSelector('body[data-ready="true"]');
    return page;
  };
  const alice = await open("alice");
  const bob = await open("bob");
  await alice.waitForSelector('#members li[data-user="bob"]');
  const say = async (page, text) => {
    await page.fill("#text", text);
    await page.click("#send");
    await alice.waitForSelector(`#messages li:has-text(${JSON.stringify(text)})`);
  };
  await say(alice, "Hi Bob! The agenda is in the shared document.");
  await say(bob, "Thanks, reading it now.");
  await say(alice, "Add anything I missed: it is kept for whoever joins later.");
  for (const [page, line] of [
    [alice, "Agenda for Friday"],
    [alice, "Try the demo in two browsers"],
    [bob, "Kill an edge and watch the clients move"],
  ]) {
    await page.fill("#doc-text", line);
    await page.click("#doc-add");
    await alice.waitForSelector(`#lines li:has-text(${JSON.stringify(line)})`);
  }
  // Bob's pointer on the document, and bob typing.
  const box = await bob.locator("#page").boundingBox();
  await bob.mouse.move(box.x + box.width * 0.55, box.y + box.height * 0.45);
  await bob.mouse.move(box.x + box.width * 0.6, box.y + box.height * 0.5);
  await alice.waitForSelector('#cursors .cursor[data-user="bob"]');
  await bob.locator("#text").pressSequentially("Looks good to me");
  await alice.waitForSelector('#members li[data-user="bob"][data-typing="true"]');
  await fetch(`${dev.url}/dev/notify?user=alice`, {
    method: "POST",
    body: JSON.stringify({ text: "Build #128 passed" }),
  });
  await alice.waitForSelector('#badge[data-count="1"]');
  await alice.mouse.move(5, 640);
  await alice.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await stopAll();
}
