// Bundles the web console into crates/gatekey-server/ui (or --outdir DIR):
// index.html, app.js, app.css (xterm's css included) and favicon.svg. The
// output is committed and embedded in the server binary; it must depend on
// the sources only (no timestamps, no absolute paths), so that
// scripts/check-ui.sh can rebuild it and compare.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const i = args.indexOf("--outdir");
const outdir = resolve(i >= 0 ? args[i + 1] : join(here, "../crates/gatekey-server/ui"));

rmSync(outdir, { recursive: true, force: true });
mkdirSync(outdir, { recursive: true });
await build({
  absWorkingDir: here,
  entryPoints: { app: "src/main.ts" },
  bundle: true,
  format: "iife",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  charset: "utf8",
  outdir,
  logLevel: "warning",
});
for (const f of ["index.html", "favicon.svg"]) {
  copyFileSync(join(here, "src", f), join(outdir, f));
}
console.log(`web: built ${outdir}`);
