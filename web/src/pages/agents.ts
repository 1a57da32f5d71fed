// Agents: every registered node with its connection, live (polled), with
// filters, and the control plane's session switch for admins.

import { type Agent, api, ApiError, can, enc, get, nodePath } from "../api";
import { type Page, poll, redrawer } from "../app";
import { h, replace, stateBlock, toast } from "../dom";
import { ago, localTime, typeLabel } from "../format";

export function switchCell(a: Agent, editable: boolean, onChange: () => void): HTMLElement {
  const agentSide =
    a.session_enabled_agent === null
      ? h("span", { class: "badge badge-muted", text: "agent: unknown", title: "The agent has never connected, so its own setting is unknown" })
      : h("span", {
          class: `badge ${a.session_enabled_agent ? "badge-ok" : "badge-off"}`,
          text: `agent: ${a.session_enabled_agent ? "on" : "off"}`,
          title: "session_enabled in the node's own config (changed only on the node)",
        });
  const input = h("input", {
    type: "checkbox",
    class: "switch-input",
    checked: a.session_enabled_control_plane,
    disabled: !editable,
    data: { key: `switch:${a.id}` },
    aria: { label: `Sessions allowed by the control plane for ${a.name}` },
  });
  input.addEventListener("change", async () => {
    const want = input.checked;
    input.disabled = true;
    try {
      await api("PATCH", `${nodePath(a.type)}/${enc(a.id)}`, { session_enabled: want });
      toast(`Sessions ${want ? "enabled" : "disabled"} on ${a.name} by the control plane`);
      onChange();
    } catch (e) {
      input.checked = !want;
      toast(e instanceof ApiError ? e.message : String(e), "error");
    } finally {
      input.disabled = !editable;
    }
  });
  const sw = h(
    "label",
    {
      class: `switch${editable ? "" : " switch-readonly"}`,
      title: editable ? "The control plane's switch for this node" : "The control plane's switch (admins may change it)",
    },
    input,
    h("span", { class: "switch-track", aria: { hidden: "true" } }),
    h("span", { class: "switch-label", text: "control plane" }),
  );
  return h("div", { class: "switches" }, agentSide, sw);
}

export const statusDot = (a: Agent) =>
  h("span", { class: `dot ${a.connected ? "dot-ok" : "dot-off"}`, title: a.connected ? "connected" : "not connected" });

export const agentsPage: Page = (root, ctx) => {
  ctx.title("Agents");
  const operate = can.operate(ctx.role);
  const admin = can.manageNodes(ctx.role);
  let agents: Agent[] | null = null;
  let error: string | null = null;

  const search = h("input", { type: "search", class: "input", placeholder: "Search name, host, address, id", aria: { label: "Search agents" }, value: ctx.query.get("q") ?? "" });
  const status = h(
    "select",
    { class: "input", aria: { label: "Connection" } },
    h("option", { value: "", text: "All states" }),
    h("option", { value: "connected", text: "Connected" }),
    h("option", { value: "disconnected", text: "Not connected" }),
  );
  const type = h(
    "select",
    { class: "input", aria: { label: "Type" } },
    h("option", { value: "", text: "All types" }),
    ...["gateway", "hub", "spoke", "device"].map((t) => h("option", { value: t, text: typeLabel[t] })),
  );
  const count = h("span", { class: "muted" });
  const body = h("div", { class: "card-body" });
  for (const el of [search, status, type]) el.addEventListener("input", () => render());

  const draw = () => {
    if (error && !agents) {
      replace(body, stateBlock("error", "Could not load the agents", error));
      return;
    }
    if (!agents) {
      replace(body, stateBlock("loading", "Loading agents…"));
      return;
    }
    if (agents.length === 0) {
      replace(
        body,
        stateBlock("empty", "No agents yet", [
          "Register a node, e.g. ",
          h("code", { text: "gatekey-admin mesh hub create hub-1" }),
          ", and start its agent with the token it prints.",
        ]),
      );
      count.textContent = "";
      return;
    }
    const q = search.value.trim().toLowerCase();
    const shown = agents.filter(
      (a) =>
        (!status.value || (status.value === "connected") === a.connected) &&
        (!type.value || a.type === type.value) &&
        (!q || [a.name, a.id, a.hostname, a.remote_addr, a.version].some((v) => v && v.toLowerCase().includes(q))),
    );
    const up = agents.filter((a) => a.connected).length;
    count.textContent = `${up} of ${agents.length} connected`;
    if (shown.length === 0) {
      replace(body, stateBlock("empty", "No agent matches the filter"));
      return;
    }
    const now = Date.now();
    const rows = shown.map((a) => {
      const blocked = !a.connected ? "The agent is not connected" : !a.session_enabled ? "Sessions are disabled for this node" : "";
      const actions = operate
        ? h(
            "div",
            { class: "actions" },
            blocked
              ? h("span", { class: "btn btn-sm disabled", text: "Console", title: blocked, aria: { disabled: "true" } })
              : h("a", { class: "btn btn-sm btn-primary", href: `#/agents/${enc(a.name)}/console`, text: "Console" }),
            blocked
              ? h("span", { class: "btn btn-sm disabled", text: "Exec", title: blocked, aria: { disabled: "true" } })
              : h("a", { class: "btn btn-sm", href: `#/agents/${enc(a.name)}/exec`, text: "Exec" }),
          )
        : null;
      return h(
        "tr",
        { data: { agent: a.name }, class: a.connected ? "" : "row-off" },
        h(
          "td",
          null,
          h(
            "div",
            { class: "agent-cell" },
            statusDot(a),
            h("div", null, h("a", { class: "strong", href: `#/agents/${enc(a.name)}`, text: a.name }), h("div", { class: "sub" }, h("span", { class: "sub-type", text: `${typeLabel[a.type] ?? a.type} · ` }), a.hostname ?? a.id)),
          ),
        ),
        h("td", { class: "col-type" }, h("span", { class: "badge badge-type", text: typeLabel[a.type] ?? a.type })),
        h("td", { class: "col-status" }, h("span", { class: a.connected ? "text-ok" : "muted", text: a.connected ? "Connected" : "Not connected" })),
        h("td", { class: "col-version mono", text: a.version ?? "—" }),
        h("td", { class: "col-addr mono", text: a.remote_addr ?? "—" }),
        h("td", { class: "col-seen", title: localTime(a.last_seen), text: a.connected ? "now" : ago(a.last_seen, now) }),
        h("td", null, switchCell(a, admin, () => void load())),
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
          { class: "table", id: "agents-table" },
          h(
            "thead",
            null,
            h(
              "tr",
              null,
              h("th", { text: "Agent" }),
              h("th", { class: "col-type", text: "Type" }),
              h("th", { class: "col-status", text: "Status" }),
              h("th", { class: "col-version", text: "Version" }),
              h("th", { class: "col-addr", text: "Address" }),
              h("th", { class: "col-seen", text: "Last seen" }),
              h("th", { text: "Sessions" }),
              operate ? h("th", { class: "col-actions" }, h("span", { class: "sr-only", text: "Actions" })) : null,
            ),
          ),
          h("tbody", null, rows),
        ),
      ),
    );
  };

  const live = redrawer(body, draw);
  // What the table shows: redrawn only when it changes.
  const render = () =>
    live.redraw(
      JSON.stringify([
        error,
        agents?.map((a) => ({ ...a, last_seen: a.connected ? null : ago(a.last_seen) })),
        search.value,
        status.value,
        type.value,
      ]),
    );

  const load = async () => {
    try {
      agents = (await get<{ items: Agent[] }>("/api/v1/agents")).items.sort((a, b) => a.name.localeCompare(b.name));
      error = null;
    } catch (e) {
      error = (e as Error).message;
      if (agents) toast(`Refreshing the agents failed: ${error}`, "error");
    }
    render();
  };

  replace(
    root,
    h(
      "div",
      { class: "page" },
      h("div", { class: "page-head" }, h("h1", { text: "Agents" }), count),
      h("section", { class: "card" }, h("div", { class: "toolbar" }, search, status, type), body),
    ),
  );
  render();
  const stop = poll(load, 3000);
  return () => {
    stop();
    live.dispose();
  };
};
