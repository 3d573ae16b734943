// Chromium driven through playwright-core: Debian's chromium (or
// $CHROMIUM), headless, with a fresh profile (playwright makes a new
// temporary user-data dir for every launch); playwright never downloads a
// browser of its own here.
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
/** Generous: a loaded 2-core machine renders slowly. */
export const UI_TIMEOUT_MS = 20_000;

export async function launch() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `no browser at ${CHROMIUM}: run scripts/install-browser.sh (Debian's chromium), or set CHROMIUM to a Chromium binary`,
    );
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 60_000,
  });
}

/** A new page whose console errors and uncaught exceptions are kept, for failure messages. */
export async function newPage(context, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(UI_TIMEOUT_MS);
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(`[${label}] uncaught: ${e.message}`));
  page.on("console", (m) => {
    // Failed loads are reported below, with their URL.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) {
      page.problems.push(`[${label}] console: ${m.text()}`);
    }
  });
  page.on("response", (r) => {
    if (r.status() >= 400) page.problems.push(`[${label}] HTTP ${r.status()} for ${r.url()}`);
  });
  return page;
}
