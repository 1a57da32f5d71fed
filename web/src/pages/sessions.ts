// Live sessions (consoles and execs) with Kill, polled.

import { type LiveSession, api, ApiError, can, enc, get } from "../api";
import { type Page, poll, redrawer } from "../app";
import { h, replace, stateBlock, toast } from "../dom";
import { ago, bytes, localTime } from "../format";

export const sessionsPage: Page = (root, ctx) => {
  ctx.title("Sessions");
  const operate = can.operate(ctx.role);
  let sessions: LiveSession[] | null = null;
  let error: string | null = null;
  /** The session whose Kill waits for confirmation. */
  let confirming: string | null = null;
  const body = h("div", { class: "card-body" });
  const count = h("span", { class: "muted" });

  const kill = async (s: LiveSession, btn: HTMLButtonElement) => {
    btn.disabled = true;
    btn.textContent = "Killing…";
    try {
      await api("DELETE", `/api/v1/sessions/${enc(s.id)}`);
      toast(`Killed the ${s.kind} on ${s.agent}`);
    } catch (e) {
      toast(e instanceof ApiError ? e.message : String(e), "error");
    }
    confirming = null;
    await load();
  };

  const draw = () => {
    if (!sessions) {
      replace(body, error ? stateBlock("error", "Could not load the sessions", error) : stateBlock("loading", "Loading sessions…"));
      return;
    }
    count.textContent = sessions.length === 1 ? "1 active" : `${sessions.length} active`;
    if (sessions.length === 0) {
      replace(body, stateBlock("empty", "No active sessions", "Consoles and running commands appear here while they last."));
      return;
    }
    const now = Date.now();
    const rows = sessions.map((s) => {
      let actions: HTMLElement | null = null;
      if (operate) {
        const killBtn = h("button", { class: "btn btn-sm btn-danger", type: "button", text: confirming === s.id ? "Confirm kill" : "Kill", data: { key: `kill:${s.id}` } });
        killBtn.addEventListener("click", () => {
          if (confirming === s.id) void kill(s, killBtn);
          else {
            confirming = s.id;
            render();
          }
        });
        actions = h(
          "div",
          { class: "actions" },
          s.kind === "console" ? h("a", { class: "btn btn-sm", href: `#/agents/${enc(s.agent)}/console?mode=share`, text: "Join" }) : null,
          s.kind === "console" ? h("a", { class: "btn btn-sm", href: `#/agents/${enc(s.agent)}/console?mode=observe`, text: "Observe" }) : null,
          killBtn,
          confirming === s.id ? h("button", { class: "btn btn-sm btn-ghost", type: "button", text: "Cancel", on: { click: () => ((confirming = null), render()) } }) : null,
        );
      }
      return h(
        "tr",
        { data: { session: s.id, agent: s.agent, kind: s.kind } },
        h("td", null, h("a", { class: "strong", href: `#/agents/${enc(s.agent)}`, text: s.agent }), h("div", { class: "sub mono", text: s.id })),
        h(
          "td",
          null,
          h("span", { class: `badge ${s.kind === "console" ? "badge-info" : "badge-muted"}`, text: s.kind }),
          s.command ? h("div", { class: "sub mono truncate", title: s.command, text: s.command }) : null,
        ),
        h("td", { class: "col-mode", text: s.mode }),
        h(
          "td",
          null,
          h(
            "div",
            { class: "chips" },
            s.participants.map((p) =>
              h("span", { class: "chip", title: `${p.remote_addr ?? ""} joined ${localTime(p.joined_at)}`, text: p.mode === "observe" ? `${p.user} (observe)` : p.user }),
            ),
          ),
        ),
        h("td", { class: "col-seen", title: localTime(s.started_at), text: ago(s.started_at, now) }),
        h("td", { class: "col-bytes mono", text: `${bytes(s.bytes_in)} / ${bytes(s.bytes_out)}` }),
        operate ? h("td", { class: "col-actions" }, actions) : null,
      );
    });
    replace(
      body,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", id: "sessions-table" },
          h(
            "thead",
            null,
            h(
              "tr",
              null,
              h("th", { text: "Agent / session" }),
              h("th", { text: "Kind" }),
              h("th", { class: "col-mode", text: "Mode" }),
              h("th", { text: "Participants" }),
              h("th", { class: "col-seen", text: "Started" }),
              h("th", { class: "col-bytes", text: "In / out", title: "client input / output bytes" }),
              operate ? h("th", { class: "col-actions" }, h("span", { class: "sr-only", text: "Actions" })) : null,
            ),
          ),
          h("tbody", null, rows),
        ),
      ),
    );
  };

  const live = redrawer(body, draw);
  const render = () => live.redraw(JSON.stringify([error, sessions?.map((s) => ({ ...s, started_at: ago(s.started_at) })), confirming]));

  const load = async () => {
    try {
      sessions = (await get<{ sessions: LiveSession[] }>("/api/v1/sessions")).sessions.sort((a, b) => b.started_at.localeCompare(a.started_at));
      error = null;
      if (confirming && !sessions.some((s) => s.id === confirming)) confirming = null;
    } catch (e) {
      error = (e as Error).message;
      if (sessions) toast(`Refreshing the sessions failed: ${error}`, "error");
    }
    render();
  };

  replace(
    root,
    h("div", { class: "page" }, h("div", { class: "page-head" }, h("h1", { text: "Sessions" }), count), h("section", { class: "card" }, body)),
  );
  render();
  const stop = poll(load, 3000);
  return () => {
    stop();
    live.dispose();
  };
};
