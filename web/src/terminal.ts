// A browser terminal on an agent's console: xterm.js over the console
// WebSocket (docs/api.md "Consoles"). Fits its box and sends resizes;
// copy/paste; a clear state while waiting; when a console is already open,
// offers to share, observe or take it over; on close, says why and offers
// to reconnect.

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import { type Agent, type LiveSession, ApiError, enc, get, query, wsUrl } from "./api";
import { ChannelStream, describeEnd, STDIN } from "./channel";
import { button, h, replace, toast } from "./dom";
import { ago, localTime } from "./format";

export type JoinMode = "exclusive" | "share" | "observe" | "force";

const THEME = {
  background: "#0d1117",
  foreground: "#d6dde6",
  cursor: "#9ecbff",
  cursorAccent: "#0d1117",
  selectionBackground: "#264f78",
  black: "#1b1f24",
  red: "#ff7b72",
  green: "#7ee787",
  yellow: "#e3b341",
  blue: "#79c0ff",
  magenta: "#d2a8ff",
  cyan: "#56d4dd",
  white: "#c9d1d9",
  brightBlack: "#6e7681",
  brightRed: "#ffa198",
  brightGreen: "#aff5b4",
  brightYellow: "#f8e3a1",
  brightBlue: "#a5d6ff",
  brightMagenta: "#e2c5ff",
  brightCyan: "#b3f0ff",
  brightWhite: "#f0f6fc",
};

/** Mounts a console for `agent` into `root`; returns the cleanup. */
export function mountConsole(root: HTMLElement, agentName: string, initial: JoinMode): () => void {
  const term = new Terminal({
    theme: THEME,
    fontFamily: 'ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    lineHeight: 1.15,
    cursorBlink: true,
    scrollback: 5000,
    allowProposedApi: false,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);

  const pill = h("span", { class: "pill" });
  const size = h("span", { class: "muted mono term-size", title: "terminal size (columns × rows)" });
  const copyBtn = button("Copy", () => void copy(), "btn btn-sm btn-dark");
  copyBtn.title = "Copy the selection (Ctrl+Shift+C)";
  const pasteBtn = button("Paste", () => void paste(), "btn btn-sm btn-dark");
  pasteBtn.title = "Paste from the clipboard (Ctrl+Shift+V)";
  const disconnectBtn = button("Disconnect", () => disconnect(), "btn btn-sm btn-dark");
  const host = h("div", { class: "term-host" });
  const overlay = h("div", { class: "term-overlay" });
  overlay.hidden = true;
  const view = h(
    "div",
    { class: "console", data: { state: "checking" } },
    h("div", { class: "console-bar" }, pill, size, h("span", { class: "spacer" }), copyBtn, pasteBtn, disconnectBtn),
    h("div", { class: "term-wrap" }, host, overlay),
  );
  root.append(view);
  term.open(host);

  let stream: ChannelStream | null = null;
  let mode: JoinMode = initial;
  let left = false;

  const setState = (state: string, label: string, kind: "ok" | "warn" | "off" | "busy") => {
    view.dataset.state = state;
    pill.className = `pill pill-${kind}`;
    replace(pill, kind === "busy" ? h("span", { class: "spinner spinner-sm" }) : h("span", { class: "pill-dot" }), label);
    const live = state === "open";
    disconnectBtn.disabled = !live;
    pasteBtn.disabled = !live || mode === "observe";
  };

  const showOverlay = (kind: string, title: string, detail: (Node | string)[], actions: HTMLElement[] = []) => {
    overlay.hidden = false;
    overlay.dataset.kind = kind;
    replace(
      overlay,
      h(
        "div",
        { class: `overlay-card overlay-${kind}`, role: kind === "waiting" ? "status" : "alert" },
        kind === "waiting" ? h("span", { class: "spinner" }) : null,
        h("div", { class: "overlay-title", text: title }),
        detail.length ? h("div", { class: "overlay-detail" }, detail) : null,
        actions.length ? h("div", { class: "overlay-actions" }, actions) : null,
      ),
    );
  };
  const hideOverlay = () => {
    overlay.hidden = true;
    replace(overlay);
  };

  const refit = () => {
    if (left || host.clientWidth === 0 || host.clientHeight === 0) return;
    try {
      fit.fit();
    } catch {
      // Not laid out yet.
    }
    size.textContent = `${term.cols}×${term.rows}`;
  };
  let pending = 0;
  const observer = new ResizeObserver(() => {
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(refit);
  });
  observer.observe(host);

  term.onResize(({ cols, rows }) => {
    size.textContent = `${cols}×${rows}`;
    stream?.resize(cols, rows);
  });
  term.onData((d) => {
    if (mode !== "observe") stream?.send(STDIN, d);
  });
  term.onBinary((d) => {
    if (mode !== "observe") stream?.send(STDIN, Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff));
  });
  term.attachCustomKeyEventHandler((ev) => {
    if (ev.type !== "keydown" || !ev.ctrlKey || !ev.shiftKey) return true;
    if (ev.code === "KeyC") {
      void copy();
      ev.preventDefault();
      return false;
    }
    // Ctrl+Shift+V: the browser pastes into xterm's textarea.
    return ev.code !== "KeyV";
  });

  async function copy(): Promise<void> {
    const text = term.getSelection();
    if (!text) {
      toast("Select text in the terminal first", "error");
      return;
    }
    try {
      await navigator.clipboard.writeText(text);
      toast("Copied");
    } catch (e) {
      toast(`Cannot copy: ${(e as Error).message}`, "error");
    }
    term.focus();
  }

  async function paste(): Promise<void> {
    try {
      const text = await navigator.clipboard.readText();
      if (text) term.paste(text);
    } catch {
      toast("The browser does not allow reading the clipboard here: use Ctrl+Shift+V", "error");
    }
    term.focus();
  }

  function disconnect(): void {
    if (!stream) return;
    stream.close();
    stream = null;
    setState("closed", "Disconnected", "off");
    showOverlay("closed", "Disconnected", ["You closed the connection; the console ended unless others share it."], [
      button("Reconnect", () => void start(), "btn btn-primary"),
    ]);
  }

  /** Why a console cannot open now, or null; also finds an open console. */
  async function precheck(): Promise<{ blocked: [string, string] | null; open: LiveSession | null }> {
    const a = await get<Agent>(`/api/v1/agents/${enc(agentName)}`);
    if (!a.connected) {
      return { blocked: [`${a.name} is not connected`, `Last seen ${ago(a.last_seen)}${a.last_seen ? ` (${localTime(a.last_seen)})` : ""}.`], open: null };
    }
    if (!a.session_enabled_control_plane) {
      return { blocked: ["Sessions are disabled", `The control plane's switch for ${a.name} is off; an admin can turn it on in Agents.`], open: null };
    }
    if (a.session_enabled_agent === false) {
      return { blocked: ["Sessions are disabled on the node", `${a.name}'s own config has session_enabled: false.`], open: null };
    }
    const { sessions } = await get<{ sessions: LiveSession[] }>("/api/v1/sessions");
    const open = sessions.find((s) => s.kind === "console" && (s.agent === a.name || s.agent_id === a.id)) ?? null;
    return { blocked: null, open };
  }

  async function start(wanted?: JoinMode): Promise<void> {
    if (left) return;
    stream?.close();
    stream = null;
    setState("checking", "Checking…", "busy");
    showOverlay("waiting", `Checking ${agentName}…`, []);
    let check;
    try {
      check = await precheck();
    } catch (e) {
      if (left) return;
      setState("error", "Unavailable", "off");
      showOverlay("error", "Cannot open a console", [e instanceof ApiError ? e.message : String(e)], [
        button("Retry", () => void start(wanted), "btn btn-primary"),
      ]);
      return;
    }
    if (left) return;
    if (check.blocked) {
      setState("blocked", "Unavailable", "off");
      showOverlay("blocked", check.blocked[0], [check.blocked[1]], [button("Retry", () => void start(wanted), "btn btn-primary")]);
      return;
    }
    let m: JoinMode = wanted ?? "exclusive";
    if (check.open && m === "exclusive") {
      offer(check.open);
      return;
    }
    if (!check.open && m === "observe") {
      setState("closed", "No console", "off");
      showOverlay("closed", "No console to observe", [`Nobody has a console open on ${agentName} now.`], [
        button("Open a console", () => void start("exclusive"), "btn btn-primary"),
      ]);
      return;
    }
    if (!check.open && m === "share") m = "exclusive";
    connect(m);
  }

  function offer(open: LiveSession): void {
    setState("busy", "Console in use", "warn");
    const holders = open.participants.map((p) => `${p.user}${p.mode === "observe" ? " (observing)" : ""}`).join(", ") || open.users.join(", ");
    showOverlay(
      "busy",
      "A console is already open",
      [
        h("span", null, `On ${agentName} by `, h("strong", { text: holders }), ` since ${localTime(open.started_at)} (${ago(open.started_at)}).`),
        h("br"),
        "Share it (everybody types and sees the same screen), observe it read-only, or take it over: its users are told and disconnected.",
      ],
      [
        button("Share", () => connect("share"), "btn btn-primary"),
        button("Observe", () => connect("observe"), "btn"),
        button("Take over", () => connect("force"), "btn btn-danger"),
        h("a", { class: "btn btn-ghost", href: "#/agents", text: "Cancel" }),
      ],
    );
  }

  function connect(m: JoinMode): void {
    if (left) return;
    mode = m;
    term.reset();
    term.options.disableStdin = m === "observe";
    refit();
    const metadata = JSON.stringify({
      tty: true,
      term: "xterm-256color",
      initialDimensions: { Width: term.cols, Height: term.rows },
    });
    const url = wsUrl(
      `/ws/v1/agents/${enc(agentName)}/console` +
        query({ metadata, mode: m === "share" || m === "observe" ? m : null, force: m === "force" ? "true" : null }),
    );
    const verb = m === "share" ? "Joining" : m === "observe" ? "Joining (observe)" : m === "force" ? "Taking over" : "Connecting to";
    setState("connecting", "Connecting…", "busy");
    showOverlay("waiting", `${verb} ${agentName}…`, ["Waiting for the agent to start the shell."]);
    const s = new ChannelStream(url, {
      onOpen: () => {
        if (s !== stream) return;
        hideOverlay();
        const label = m === "observe" ? "Observing (read-only)" : m === "share" ? "Connected · shared" : "Connected";
        setState("open", label, "ok");
        term.focus();
      },
      onOutput: (_ch, data) => term.write(data),
      onClose: (status, ev, opened) => {
        if (s !== stream || left) return;
        stream = null;
        if (!opened) {
          void explainRefusal(m);
          return;
        }
        const end = describeEnd(status, ev);
        setState("closed", "Closed", "off");
        showOverlay(
          "closed",
          "Connection closed",
          [h("span", { class: "overlay-reason", text: status?.reason ?? end.title }), h("span", { class: "overlay-message", text: end.detail })],
          [button("Reconnect", () => void start(), "btn btn-primary")],
        );
      },
    });
    stream = s;
  }

  // A browser cannot read the HTTP answer of a refused upgrade: look again.
  async function explainRefusal(m: JoinMode): Promise<void> {
    let why = "The control plane refused the connection.";
    try {
      const check = await precheck();
      if (check.blocked) why = `${check.blocked[0]}: ${check.blocked[1]}`;
      else if (check.open && m === "exclusive") {
        offer(check.open);
        return;
      } else if (m === "observe" && !check.open) why = "The console ended before we could join it.";
    } catch (e) {
      why = e instanceof ApiError ? e.message : String(e);
    }
    if (left) return;
    setState("error", "Refused", "off");
    showOverlay("error", "Could not open the console", [why], [button("Retry", () => void start(m === "force" ? "exclusive" : m), "btn btn-primary")]);
  }

  requestAnimationFrame(() => {
    refit();
    void start(initial);
  });

  return () => {
    left = true;
    observer.disconnect();
    cancelAnimationFrame(pending);
    stream?.close();
    stream = null;
    term.dispose();
  };
}
