// One agent: its state, and the console and exec tabs.

import { type Agent, ApiError, can, enc, get } from "../api";
import { type Page, poll } from "../app";
import { h, replace, stateBlock } from "../dom";
import { mountExec } from "../exec";
import { ago, localTime, typeLabel } from "../format";
import { type JoinMode, mountConsole } from "../terminal";
import { statusDot, switchCell } from "./agents";

export const agentPage: Page = (root, ctx) => {
  const name = ctx.params.name;
  const operate = can.operate(ctx.role);
  const tab = operate ? (ctx.params.tab ?? "console") : null;
  ctx.title(`${name}${tab ? " · " + (tab === "exec" ? "Exec" : "Console") : ""}`);
  root.classList.add("main-full");

  const info = h("div", { class: "agent-info" });
  const tabs = operate
    ? h(
        "nav",
        { class: "tabs", aria: { label: "Agent views" } },
        h("a", { class: `tab${tab === "console" ? " active" : ""}`, href: `#/agents/${enc(name)}/console`, text: "Console" }),
        h("a", { class: `tab${tab === "exec" ? " active" : ""}`, href: `#/agents/${enc(name)}/exec`, text: "Exec" }),
      )
    : null;
  const body = h("div", { class: "agent-body" });
  replace(
    root,
    h(
      "div",
      { class: "agent-page" },
      h(
        "div",
        { class: "agent-head" },
        h("div", { class: "crumbs" }, h("a", { href: "#/agents", text: "Agents" }), h("span", { class: "crumb-sep", text: "/" }), h("span", { class: "strong", text: name })),
        info,
        tabs,
      ),
      body,
    ),
  );

  const showInfo = (a: Agent) => {
    replace(
      info,
      h("span", { class: "agent-state" }, statusDot(a), a.connected ? "Connected" : `Not connected · last seen ${ago(a.last_seen)}`),
      h("span", { class: "badge badge-type", text: typeLabel[a.type] ?? a.type }),
      a.version ? h("span", { class: "meta mono", text: `v${a.version}` }) : null,
      a.remote_addr ? h("span", { class: "meta mono", text: a.remote_addr }) : null,
      a.hostname ? h("span", { class: "meta", text: a.hostname }) : null,
    );
  };

  let cleanup: (() => void) | null = null;
  let left = false;
  get<Agent>(`/api/v1/agents/${enc(name)}`).then(
    (a) => {
      if (left) return;
      showInfo(a);
      if (tab === "console") {
        const mode = ctx.query.get("mode");
        const initial: JoinMode = mode === "share" || mode === "observe" ? mode : "exclusive";
        cleanup = mountConsole(body, a.name, initial);
      } else if (tab === "exec") {
        body.classList.add("agent-body-pad");
        cleanup = mountExec(body, a.name);
      } else {
        body.classList.add("agent-body-pad");
        replace(
          body,
          h(
            "section",
            { class: "card" },
            h(
              "dl",
              { class: "facts" },
              h("dt", { text: "ID" }),
              h("dd", { class: "mono", text: a.id }),
              h("dt", { text: "Connected since" }),
              h("dd", { text: a.connected ? localTime(a.connected_at) : "—" }),
              h("dt", { text: "Last seen" }),
              h("dd", { text: localTime(a.last_seen) }),
              h("dt", { text: "Sessions" }),
              h("dd", null, switchCell(a, false, () => {})),
            ),
            h("p", { class: "muted pad", text: "Your role may list agents but not open consoles or run commands." }),
          ),
        );
      }
    },
    (e) => {
      if (left) return;
      replace(info);
      replace(
        body,
        stateBlock(
          "error",
          e instanceof ApiError && e.status === 404 ? `No agent named ${name}` : "Could not load the agent",
          [(e as Error).message, " ", h("a", { href: "#/agents", text: "Back to the agents" })],
        ),
      );
    },
  );
  // Keep the header's state current (the agent may come and go).
  let first = true;
  const stopInfo = poll(async () => {
    if (first) {
      first = false;
      return;
    }
    try {
      showInfo(await get<Agent>(`/api/v1/agents/${enc(name)}`));
    } catch {
      // The body says what is wrong.
    }
  }, 5000);
  return () => {
    left = true;
    stopInfo();
    cleanup?.();
  };
};
