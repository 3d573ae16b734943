// Builds the SDK: type-checks src/ with tsc (also emitting build/, the
// per-module output the unit tests import), bundles src/herald.ts into the one
// file dist/herald.js that browsers load and the herald binary serves, and
// copies its declarations to dist/herald.d.ts. With --check it builds into a
// temporary directory and fails if the committed dist/ differs, so a change to
// src/ cannot land without the dist/ it builds to.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import * as esbuild from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const check = process.argv.includes("--check");
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const require = createRequire(import.meta.url);

const tsc = require.resolve("typescript/bin/tsc");
try {
  execFileSync(process.execPath, [tsc, "-p", join(root, "tsconfig.json")], { stdio: "inherit", cwd: root });
} catch {
  console.error("build: tsc found errors in src/ (above)");
  process.exit(1);
}

const declarations = readFileSync(join(root, "build", "herald.d.ts"), "utf8");
if (/^\s*import\s/m.test(declarations) || /\bfrom\s+["']\.\//.test(declarations)) {
  console.error("build: build/herald.d.ts refers to other modules; its public API must be declared in src/herald.ts");
  process.exit(1);
}

const banner =
  `// ${pkg.name} ${pkg.version}: Herald's client for browsers and Node (ES module, no dependencies).\n` +
  "// Built from clients/js/src by `npm run build`; do not edit by hand.";

const out = check ? mkdtempSync(join(tmpdir(), "herald-js-check-")) : join(root, "dist");
mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: [join(root, "src", "herald.ts")],
  outfile: join(out, "herald.js"),
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: "es2020",
  banner: { js: banner },
  legalComments: "none",
  logLevel: "warning",
});
writeFileSync(join(out, "herald.d.ts"), `${banner}\n\n${declarations}`);

if (check) {
  let stale = [];
  for (const f of ["herald.js", "herald.d.ts"]) {
    let committed = "";
    try {
      committed = readFileSync(join(root, "dist", f), "utf8");
    } catch {
      committed = "(missing)";
    }
    if (committed !== readFileSync(join(out, f), "utf8")) stale.push(`dist/${f}`);
  }
  rmSync(out, { recursive: true, force: true });
  if (stale.length > 0) {
    console.error(`check: ${stale.join(" and ")} ${stale.length === 1 ? "differs" : "differ"} from what src/ builds to; run \`npm run build\` and commit dist/`);
    process.exit(1);
  }
  console.log("check: dist/ is what src/ builds to");
} else {
  console.log(`build: wrote dist/herald.js and dist/herald.d.ts`);
}
