// The web console: sign-in, then a header with the pages and a hash router.

import "@xterm/xterm/css/xterm.css";
import "./app.css";

import { ApiError, can, get, request, setSignedOutHandler, type Whoami } from "./api";
import type { Ctx, Page } from "./app";
import { h, replace, stateBlock, toast } from "./dom";
import { agentPage } from "./pages/agent";
import { agentsPage } from "./pages/agents";
import { auditPage } from "./pages/audit";
import { loginPage } from "./pages/login";
import { sessionsPage } from "./pages/sessions";
import { troubleshootPage } from "./pages/troubleshoot";

interface Route {
  pattern: RegExp;
  keys: string[];
  page: Page;
  nav: string;
}

const routes: Route[] = [
  { pattern: /^agents\/?$/, keys: [], page: agentsPage, nav: "agents" },
  { pattern: /^agents\/([^/]+)(?:\/(console|exec))?\/?$/, keys: ["name", "tab"], page: agentPage, nav: "agents" },
  { pattern: /^sessions\/?$/, keys: [], page: sessionsPage, nav: "sessions" },
  { pattern: /^troubleshoot\/?$/, keys: [], page: troubleshootPage, nav: "troubleshoot" },
  { pattern: /^audit\/?$/, keys: [], page: auditPage, nav: "audit" },
];

const app = document.getElementById("app") as HTMLElement;
let leave: (() => void) | void;
let me: Whoami | null = null;
let main: HTMLElement | null = null;
const navLinks = new Map<string, HTMLAnchorElement>();

function leavePage(): void {
  if (leave) leave();
  leave = undefined;
}

function showLogin(message?: string): void {
  leavePage();
  me = null;
  main = null;
  document.title = "Sign in · gatekey";
  replace(app, loginPage(message, signedIn));
}

async function signedIn(who: Whoami): Promise<void> {
  me = who;
  renderShell();
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.replace("#/agents");
  route();
}

function renderShell(): void {
  if (!me) return;
  const role = me.user.role;
  navLinks.clear();
  const link = (id: string, label: string) => {
    const a = h("a", { href: `#/${id}`, class: "nav-link", text: label });
    navLinks.set(id, a);
    return a;
  };
  const signOut = async () => {
    try {
      await request("POST", "/api/v1/logout");
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) {
        toast((e as Error).message, "error");
        return;
      }
    }
    location.hash = "";
    showLogin("You have signed out.");
  };
  const version = h("span", { class: "brand-version" });
  get<{ version: string }>("/api/v1/version").then(
    (v) => (version.textContent = "v" + v.version),
    () => {},
  );
  main = h("main", { class: "main", id: "main" });
  replace(
    app,
    h(
      "header",
      { class: "topbar" },
      h("a", { class: "brand", href: "#/agents" }, h("img", { src: "/ui/favicon.svg", attrs: { alt: "", width: "22", height: "22" } }), h("span", { text: "gatekey" }), version),
      h(
        "nav",
        { class: "nav", aria: { label: "Main" } },
        link("agents", "Agents"),
        link("sessions", "Sessions"),
        can.operate(role) ? link("troubleshoot", "Troubleshoot") : null,
        can.readAudit(role) ? link("audit", "Audit") : null,
      ),
      h(
        "div",
        { class: "user" },
        h("span", { class: "user-name", text: me.user.name, title: `signed in as ${me.user.name} (${role})` }),
        h("span", { class: `role role-${role}`, text: role }),
        h("button", { class: "btn btn-ghost btn-sm", type: "button", text: "Sign out", on: { click: () => void signOut() } }),
      ),
    ),
    main,
  );
}

function route(): void {
  if (!me || !main) return;
  leavePage();
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, qs] = raw.split("?", 2) as [string, string | undefined];
  for (const [id, a] of navLinks) a.classList.toggle("active", path === id || path.startsWith(id + "/"));
  const r = routes.find((r) => r.pattern.test(path));
  main.className = "main";
  replace(main);
  if (!r) {
    if (path === "") {
      location.replace("#/agents");
      return;
    }
    main.append(stateBlock("empty", "Page not found", h("a", { href: "#/agents", text: "Back to the agents" })));
    return;
  }
  const m = r.pattern.exec(path)!;
  const params: Record<string, string> = {};
  r.keys.forEach((k, i) => {
    if (m[i + 1] !== undefined) params[k] = decodeURIComponent(m[i + 1]);
  });
  const ctx: Ctx = {
    me,
    role: me.user.role,
    params,
    query: new URLSearchParams(qs ?? ""),
    title: (t) => (document.title = `${t} · gatekey`),
  };
  leave = r.page(main, ctx);
}

window.addEventListener("hashchange", route);
setSignedOutHandler((message) => {
  if (me) showLogin(`Signed out: ${message}`);
});

async function boot(): Promise<void> {
  replace(app, stateBlock("loading", "Loading…"));
  try {
    await signedIn(await get<Whoami>("/api/v1/whoami"));
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) showLogin();
    else replace(app, stateBlock("error", "Cannot reach the control plane", (e as Error).message));
  }
}

void boot();
