// The web console in headless Chromium against a real control plane and a
// real agent, both started here from target/debug (cargo build -p gatekey):
// sign-in both ways, the agent list, a terminal (a command, resizes), a
// take-over seen by the first user, the exec panel, killing a session,
// a ping from the troubleshoot panel, the audit page, roles, a narrow
// window and sign-out. Screenshots go to test-artifacts/ui/.
//
// Run: cd web && npm test   (scripts/test.sh runs it after the cargo tests)

import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, copyFileSync, createWriteStream } from "node:fs";
import https from "node:https";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const CHROMIUM = process.env.GATEKEY_CHROMIUM ?? "/usr/bin/chromium";
const bin = (name) => join(root, "target/debug", name);
const artifacts = join(root, "test-artifacts/ui");

const skip = !existsSync(CHROMIUM) && !process.env.CI ? `${CHROMIUM} is missing (scripts/setup.sh installs chromium)` : false;
if (skip) console.log(`SKIP: ${skip}; the web console's browser tests did not run`);
/** Every test: skipped without Chromium; none may hang a CI run. */
const opts = { skip, timeout: 90_000 };

const procs = [];
let dir;
let base;
let ca;
let adminKey;
let viewerKey;
let agent;
let browser;
const pages = {};
/** Console errors of every page, checked at the end. */
const consoleErrors = [];

// ---- processes ----

function killAll() {
  for (const p of procs) {
    if (p.exitCode === null && p.signalCode === null) {
      try {
        p.kill("SIGKILL");
      } catch {
        // gone
      }
    }
  }
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

function startServer() {
  const log = createWriteStream(join(dir, "server.log"));
  const env = { ...process.env, RUST_LOG: "info,gatekey_server=debug" };
  delete env.GATEKEY_CONFIG;
  const p = spawn(bin("gatekey-server"), ["--listen", "127.0.0.1:0", "--data-dir", join(dir, "server")], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  procs.push(p);
  p.stderr.pipe(log);
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error("the control plane did not start in 60 s; see " + join(dir, "server.log"))), 60_000);
    p.on("exit", (code) => fail(new Error(`gatekey-server exited (${code}); see ${join(dir, "server.log")}`)));
    const lines = createInterface({ input: p.stdout });
    lines.on("line", (line) => {
      log.write(line + "\n");
      const m = /listening on (https:\/\/\S+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
  });
}

function adminCli(args) {
  return execFileSync(bin("gatekey-admin"), args, {
    env: {
      ...process.env,
      GATEKEY_SERVER: base,
      GATEKEY_API_KEY: adminKey,
      GATEKEY_CA_CERT: ca,
      HOME: join(dir, "home"),
      XDG_CONFIG_HOME: join(dir, "home/.config"),
    },
    encoding: "utf8",
  });
}

function startAgent(name, token) {
  const cfg = join(dir, `${name}.yaml`);
  writeFileSync(cfg, `name: ${name}\ncontrol_plane_url: ${base}\ntoken: ${token}\nca_cert: ${ca}\nsession_enabled: true\n`);
  const log = createWriteStream(join(dir, `${name}.log`));
  const p = spawn(bin("gatekey-agent"), ["--config", cfg], {
    env: { ...process.env, RUST_LOG: "info", HOME: join(dir, "home") },
    stdio: ["ignore", "ignore", "pipe"],
  });
  p.stderr.pipe(log);
  procs.push(p);
  return p;
}

/** A request to the API with the admin key (or `key`). */
function call(method, path, body, key = adminKey) {
  return new Promise((ok, fail) => {
    const req = https.request(
      new URL(path, base),
      { method, ca: readFileSync(ca), headers: { authorization: `Bearer ${key}`, "content-type": "application/json" } },
      (res) => {
        let data = "";
        res.setEncoding("utf8");
        res.on("data", (c) => (data += c));
        res.on("end", () => ok({ status: res.statusCode, headers: res.headers, body: data, json: () => JSON.parse(data) }));
      },
    );
    req.on("error", fail);
    if (body !== undefined) req.write(JSON.stringify(body));
    req.end();
  });
}

async function waitFor(what, f, ms = 30_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// ---- browser ----

async function newPage(name) {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  await ctx.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  const page = await ctx.newPage();
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const url = m.location()?.url ?? "";
    // Expected refusals: the sign-in check before signing in, a wrong password, the troubleshoot error case.
    if (/status of 401/.test(m.text()) && /\/api\/v1\/(whoami|login)$/.test(url)) return;
    consoleErrors.push(`${name}: ${m.text()} (${url})`);
  });
  page.on("pageerror", (e) => consoleErrors.push(`${name}: uncaught ${e.message}`));
  pages[name] = page;
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: join(artifacts, `${name}.png`) });
}

/** The terminal's visible text, one string. */
async function screenText(page) {
  return (await page.locator(".xterm-rows").innerText()).replace(/\u00a0/g, " ");
}

async function typeInTerminal(page, text) {
  await page.locator(".term-host").click();
  await page.keyboard.type(text);
  await page.keyboard.press("Enter");
}

/** Runs `stty size` and reads the answer: [rows, cols]. */
async function sttySize(page) {
  const marker = `sz${Date.now() % 100000}`;
  await typeInTerminal(page, `clear; echo ${marker} $(stty size)`);
  const text = await waitFor("stty size", async () => {
    const t = await screenText(page);
    return new RegExp(`^${marker} (\\d+) (\\d+)\\s*$`, "m").exec(t);
  }, 15_000);
  return [Number(text[1]), Number(text[2])];
}

async function sizeLabel(page) {
  const [cols, rows] = (await page.locator(".term-size").innerText()).split("×").map(Number);
  return [rows, cols];
}

async function signInWithKey(page, key) {
  await page.goto(base + "/");
  await page.getByRole("tab", { name: "API key" }).click();
  await page.locator("#login-key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#agents-table").waitFor();
}

// ---- setup ----

before(async () => {
  if (skip) return;
  for (const b of ["gatekey-server", "gatekey-agent", "gatekey-admin"]) {
    assert.ok(existsSync(bin(b)), `${bin(b)} is missing: run cargo build -p gatekey first`);
  }
  mkdirSync(artifacts, { recursive: true });
  dir = mkdtempSync(join(tmpdir(), "gatekey-ui-"));
  mkdirSync(join(dir, "home/.config"), { recursive: true });
  base = await startServer();
  ca = join(dir, "server/tls/ca.pem");
  adminKey = readFileSync(join(dir, "server/admin-token"), "utf8").trim();
  const hub = JSON.parse(adminCli(["mesh", "hub", "create", "hub-1", "-o", "json"]));
  agent = startAgent("hub-1", hub.token);
  // A registered node whose agent never connects, for the list's other state.
  adminCli(["mesh", "spoke", "create", "spoke-lab", "-o", "json"]);
  await waitFor("hub-1 to connect", async () => (await call("GET", "/api/v1/agents/hub-1")).json().connected);
  let r = await call("POST", "/api/v1/users", { name: "alice", role: "admin", password: "correct horse battery" });
  assert.equal(r.status, 201, r.body);
  r = await call("POST", "/api/v1/users", { name: "vera", role: "viewer" });
  assert.equal(r.status, 201, r.body);
  r = await call("POST", "/api/v1/apikeys", { user: "vera", name: "ui-test" });
  assert.equal(r.status, 201, r.body);
  viewerKey = r.json().key;

  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    killAll();
    if (dir) {
      for (const f of ["server.log", "hub-1.log"]) {
        if (existsSync(join(dir, f))) copyFileSync(join(dir, f), join(artifacts, f));
      }
      if (!process.env.GATEKEY_KEEP_TEST_DIRS) rmSync(dir, { recursive: true, force: true });
    }
  }
});

// ---- tests ----

test("the sign-in page loads under a strict CSP and refuses a wrong password", opts, async () => {
  const page = await newPage("alice");
  const res = await page.goto(base + "/");
  const csp = res.headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
  assert.equal(res.headers()["x-frame-options"], "DENY");
  await page.locator("#login-user").fill("alice");
  await page.locator("#login-password").fill("wrong password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("invalid user or password").waitFor();
  await shot(page, "01-sign-in");
});

test("signs in with an API key and lists the agents live", opts, async () => {
  const page = await newPage("admin");
  await signInWithKey(page, adminKey);
  const row = page.locator('#agents-table tr[data-agent="hub-1"]');
  await row.getByText("Connected", { exact: true }).waitFor();
  assert.match(await row.innerText(), /Hub/);
  const spoke = page.locator('#agents-table tr[data-agent="spoke-lab"]');
  assert.match(await spoke.innerText(), /Not connected/);
  assert.match(await spoke.innerText(), /agent: unknown/);
  // Both sides of the session switch; admins may flip the control plane's.
  assert.match(await row.innerText(), /agent: on/);
  const sw = spoke.locator("input.switch-input");
  assert.equal(await sw.isChecked(), true);
  await spoke.locator(".switch-track").click();
  await waitFor("the switch to turn off", async () => (await call("GET", "/api/v1/mesh/spokes/spoke-lab")).json().session_enabled === false);
  await spoke.locator(".switch-track").click();
  await waitFor("the switch to turn on", async () => (await call("GET", "/api/v1/mesh/spokes/spoke-lab")).json().session_enabled === true);
  // Filters.
  await page.getByRole("searchbox", { name: "Search agents" }).fill("no-such-agent");
  await page.getByText("No agent matches the filter").waitFor();
  await page.getByRole("searchbox", { name: "Search agents" }).fill("");
  await page.getByRole("combobox", { name: "Connection" }).selectOption("connected");
  await page.locator('#agents-table tr[data-agent="spoke-lab"]').waitFor({ state: "detached" });
  await page.getByRole("combobox", { name: "Connection" }).selectOption("");
  await spoke.waitFor();
  assert.match(await page.locator(".user").innerText(), /admin/);
  await shot(page, "02-agents");
});

test("signs in with a user and password", opts, async () => {
  const page = pages.alice;
  await page.locator("#login-password").fill("correct horse battery");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator('#agents-table tr[data-agent="hub-1"]').waitFor();
  const who = await page.evaluate(async () => (await fetch("/api/v1/whoami")).json());
  assert.equal(who.user.name, "alice");
  assert.equal(who.via, "cookie");
});

test("a terminal runs echo $((6*7)) and shows 42; copy and paste work", opts, async () => {
  const page = pages.admin;
  await page.locator('#agents-table tr[data-agent="hub-1"]').getByRole("link", { name: "Console" }).click();
  await page.locator('.console[data-state="open"]').waitFor();
  await typeInTerminal(page, "echo $((6*7))");
  await waitFor("42", async () => /^42\s*$/m.test(await screenText(page)), 15_000);
  await shot(page, "03-terminal");
  // Copy: select the answer (a double click selects a word) and press Copy.
  const row = await page.locator(".xterm-rows > div", { hasText: /^42\s*$/ }).first().boundingBox();
  await page.mouse.dblclick(row.x + 4, row.y + row.height / 2);
  await page.getByRole("button", { name: "Copy" }).click();
  await page.getByText("Copied").waitFor();
  assert.equal((await page.evaluate(() => navigator.clipboard.readText())).trim(), "42");
  // Paste: from the clipboard into the shell.
  await page.evaluate(() => navigator.clipboard.writeText("echo pasted-$((6*7))"));
  await page.getByRole("button", { name: "Paste" }).click();
  await waitFor("the pasted line", async () => (await screenText(page)).includes("echo pasted-$((6*7))"), 15_000);
  await page.keyboard.press("Enter");
  await waitFor("pasted-42", async () => /^pasted-42\s*$/m.test(await screenText(page)), 15_000);
});

test("resizing the window changes the remote terminal's size", opts, async () => {
  const page = pages.admin;
  const before = await sttySize(page);
  assert.deepEqual(before, await sizeLabel(page));
  await page.setViewportSize({ width: 900, height: 600 });
  await waitFor("the terminal to refit", async () => (await sizeLabel(page))[1] < before[1]);
  const after = await sttySize(page);
  assert.deepEqual(after, await sizeLabel(page));
  assert.ok(after[0] < before[0] && after[1] < before[1], `${after} vs ${before}`);
  await shot(page, "04-terminal-resized");
  await page.setViewportSize({ width: 1280, height: 800 });
  await waitFor("the terminal to refit back", async () => (await sizeLabel(page))[1] === before[1]);
});

test("a second user takes the console over and the first is told", opts, async () => {
  const b = pages.alice;
  await b.goto(base + "/#/agents/hub-1/console");
  await b.locator('.console[data-state="busy"]').waitFor();
  assert.match(await b.locator(".term-overlay").innerText(), /already open[\s\S]*admin/);
  await shot(b, "05-console-busy");
  await b.getByRole("button", { name: "Take over" }).click();
  await b.locator('.console[data-state="open"]').waitFor();
  const a = pages.admin;
  await a.locator('.console[data-state="closed"]').waitFor();
  const told = await a.locator(".term-overlay").innerText();
  assert.match(told, /Connection closed/);
  assert.match(told, /SessionTakenOver/);
  assert.match(told, /alice took over this console/);
  await a.getByRole("button", { name: "Reconnect" }).waitFor();
  await shot(a, "06-taken-over");
  // Alice's terminal works.
  await typeInTerminal(b, "echo alice-$((40+2))");
  await waitFor("alice-42", async () => /^alice-42\s*$/m.test(await screenText(b)), 15_000);
  // The first user comes back as an observer and sees what alice does.
  await a.getByRole("button", { name: "Reconnect" }).click();
  await a.locator('.console[data-state="busy"]').waitFor();
  await a.getByRole("button", { name: "Observe" }).click();
  await a.locator('.console[data-state="open"]').waitFor();
  assert.match(await a.locator(".console-bar .pill").innerText(), /Observing/);
  await typeInTerminal(b, "echo seen-by-$((1+1))");
  await waitFor("the observer to see it", async () => /^seen-by-2\s*$/m.test(await screenText(a)), 15_000);
  await shot(a, "07-observing");
});

test("the exec panel streams output, marks stderr and shows the exit code", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/agents/hub-1/exec");
  await page.locator("#exec-command").fill("echo out-line; echo err-line >&2; exit 3");
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator('#exec-status[data-kind="err"]').waitFor();
  assert.match(await page.locator("#exec-status").innerText(), /Exit 3/);
  assert.match(await page.locator("#exec-output .stdout").first().innerText(), /out-line/);
  assert.match(await page.locator("#exec-output .stderr").first().innerText(), /err-line/);
  await shot(page, "08-exec");
  await page.locator("#exec-command").fill("echo fine");
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator('#exec-status[data-kind="ok"]').waitFor();
  assert.match(await page.locator("#exec-status").innerText(), /Exit 0/);
  await page.locator("#exec-command").fill("sleep 30");
  await page.locator("#exec-timeout").fill("1");
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator("#exec-status").getByText("Timed out", { exact: true }).waitFor({ timeout: 15_000 });
  // Stop ends a running command.
  await page.locator("#exec-timeout").fill("60");
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator("#exec-status").getByText("Running", { exact: true }).waitFor();
  await page.getByRole("button", { name: "Stop" }).click();
  await page.locator("#exec-status").getByText("Stopped", { exact: true }).waitFor();
});

test("a session is killed from the sessions page", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/sessions");
  const row = page.locator('#sessions-table tr[data-agent="hub-1"][data-kind="console"]');
  await row.waitFor();
  assert.match(await row.innerText(), /alice/);
  await shot(page, "09-sessions");
  await row.getByRole("button", { name: "Kill" }).click();
  await row.getByRole("button", { name: "Confirm kill" }).click();
  await page.getByText("No active sessions").waitFor();
  const b = pages.alice;
  await b.locator('.console[data-state="closed"]').waitFor();
  const told = await b.locator(".term-overlay").innerText();
  assert.match(told, /SessionKilled/);
  assert.match(told, /session killed by admin/);
  await shot(b, "10-killed");
});

test("the troubleshoot panel pings 127.0.0.1 from the agent", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/troubleshoot");
  const location = page.locator("#ts-location");
  await location.waitFor();
  const options = await location.locator("option").allInnerTexts();
  assert.ok(options.includes("Control Plane") && options.includes("Hub: hub-1"), String(options));
  await location.selectOption({ label: "Hub: hub-1" });
  await page.locator("#ts-tool").selectOption("ping");
  await page.locator("#ts-host").fill("127.0.0.1");
  await page.locator('input[data-opt="count"]').fill("2");
  await page.locator('input[data-opt="interval_ms"]').fill("200");
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator('#ts-status:is([data-kind="ok"], [data-kind="err"])').waitFor({ timeout: 20_000 });
  const out = await page.locator("#ts-output").innerText();
  const status = await page.locator("#ts-status").innerText();
  if (/Succeeded/.test(status)) {
    assert.match(out, /^PING 127\.0\.0\.1 \(127\.0\.0\.1\) 56\(84\) bytes of data\./m);
    assert.match(out, /bytes from 127\.0\.0\.1: icmp_seq=1/);
    assert.match(out, /2 packets transmitted, 2 received/);
  } else {
    // No ICMP socket on this machine: the panel says so.
    assert.match(status + out, /ICMP|socket|permission|not permitted/i);
  }
  await shot(page, "11-troubleshoot");
  // A TCP check of the control plane's port from the control plane: nc.
  await location.selectOption({ label: "Control Plane" });
  await page.locator("#ts-tool").selectOption("nc");
  await page.locator("#ts-host").fill("127.0.0.1");
  await page.locator('input[data-opt="port"]').fill(new URL(base).port);
  await page.getByRole("button", { name: "Run" }).click();
  await page.locator('#ts-status[data-kind="ok"]').waitFor({ timeout: 20_000 });
  assert.match(await page.locator("#ts-output").innerText(), /succeeded!/);
});

test("the audit page finds those actions, verifies the chain and exports", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/audit");
  await page.locator('#audit-verify[data-ok="true"]').waitFor();
  await page.locator("#audit-table").waitFor();
  for (const [action, expect] of [
    ["auth.login", /alice/],
    ["session.taken_over", /alice/],
    ["session.killed", /admin/],
    ["troubleshoot.run", /ping/],
  ]) {
    await page.locator("#audit-action").fill(action);
    await page.getByRole("button", { name: "Apply" }).click();
    await page.waitForURL(new RegExp(`action=${action.replace(".", "\\.")}`));
    await page.locator(`#audit-table tr[data-action="${action}"]`).first().waitFor();
    const text = await page.locator("#audit-table tbody").innerText();
    assert.match(text, expect, action);
  }
  await page.locator("#audit-action").fill("session");
  await page.locator("#audit-user").fill("admin");
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForURL(/user=admin/);
  await page.locator("#audit-table").waitFor();
  const href = await page.locator("#audit-export").getAttribute("href");
  assert.equal(href, "/api/v1/audit/export?action=session&user=admin");
  const exported = await page.evaluate(async (h) => (await fetch(h)).text(), href);
  const lines = exported.trim().split("\n").map((l) => JSON.parse(l));
  assert.ok(lines.length > 0 && lines.every((r) => r.action.startsWith("session") && r.user === "admin"), exported);
  await shot(page, "12-audit");
  // Paging back.
  await page.goto(base + "/#/audit?limit=5");
  await page.locator("#audit-table").waitFor();
  const first = await page.locator("#audit-table tr[data-seq]").first().getAttribute("data-seq");
  await page.locator("#audit-older").click();
  await page.waitForURL(/before=/);
  await page.locator("#audit-table").waitFor();
  const next = await page.locator("#audit-table tr[data-seq]").first().getAttribute("data-seq");
  assert.ok(Number(next) <= Number(first) - 5, `${next} after ${first}`);
});

test("a viewer sees agents and the audit, but no console, exec or switch", opts, async () => {
  const page = await newPage("viewer");
  await signInWithKey(page, viewerKey);
  const row = page.locator('#agents-table tr[data-agent="hub-1"]');
  await row.waitFor();
  assert.equal(await row.getByRole("link", { name: "Console" }).count(), 0);
  assert.equal(await row.locator("input.switch-input").isDisabled(), true);
  const nav = await page.locator(".nav").innerText();
  assert.doesNotMatch(nav, /Troubleshoot/);
  assert.match(nav, /Audit/);
  await page.goto(base + "/#/agents/hub-1");
  await page.getByText("Your role may list agents").waitFor();
  await page.context().close();
});

test("pages fit a narrow window", opts, async () => {
  const page = pages.admin;
  await page.setViewportSize({ width: 390, height: 800 });
  for (const [hash, name, ready] of [
    ["#/agents", "13-narrow-agents", "#agents-table"],
    ["#/sessions", "14-narrow-sessions", ".state"],
    ["#/troubleshoot", "15-narrow-troubleshoot", "#ts-location"],
    ["#/audit", "16-narrow-audit", "#audit-table"],
    ["#/agents/hub-1/console", "17-narrow-console", '.console[data-state="open"]'],
  ]) {
    await page.goto(base + "/" + hash);
    await page.locator(ready).first().waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${hash} overflows by ${overflow}px`);
    await shot(page, name);
  }
  await typeInTerminal(page, "echo narrow-$((6*7))");
  await waitFor("narrow-42", async () => /^narrow-42\s*$/m.test(await screenText(page)), 15_000);
  await page.setViewportSize({ width: 1280, height: 800 });
});

test("when the agent goes away, the terminal and the agent list say so", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/agents/hub-1/console");
  await page.locator('.console[data-state="open"]').waitFor();
  agent.kill("SIGKILL");
  await page.locator('.console[data-state="closed"]').waitFor({ timeout: 30_000 });
  assert.match(await page.locator(".term-overlay").innerText(), /ServiceUnavailable/);
  await shot(page, "18-agent-lost");
  await page.getByRole("button", { name: "Reconnect" }).click();
  await page.locator('.console[data-state="blocked"]').waitFor();
  assert.match(await page.locator(".term-overlay").innerText(), /hub-1 is not connected/);
  await page.goto(base + "/#/agents");
  await page.locator('#agents-table tr[data-agent="hub-1"].row-off').waitFor();
  assert.match(await page.locator('#agents-table tr[data-agent="hub-1"]').innerText(), /Not connected/);
});

test("signs out", opts, async () => {
  const page = pages.admin;
  await page.goto(base + "/#/agents");
  await page.locator("#agents-table").waitFor();
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByText("You have signed out.").waitFor();
  const status = await page.evaluate(async () => (await fetch("/api/v1/whoami")).status);
  assert.equal(status, 401);
  // The API key itself was not revoked: only the cookie went.
  assert.equal((await call("GET", "/api/v1/whoami")).status, 200);
});

test("no page logged an error", opts, async () => {
  assert.deepEqual(consoleErrors, []);
});
