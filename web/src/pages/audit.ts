// The audit log: filters, paging back with `before`, the hash chain's
// verification, and an export of what the filters select.

import { type AuditPage, type AuditRecord, type AuditVerify, get, query } from "../api";
import { type Page, navigate } from "../app";
import { h, replace, stateBlock } from "../dom";
import { localTime } from "../format";

const ACTIONS = [
  "agent", "agent.connected", "agent.disconnected",
  "session", "session.opened", "session.joined", "session.left", "session.closed", "session.killed", "session.taken_over", "session.timed_out", "session.input", "session.output",
  "troubleshoot.run",
  "node", "node.created", "node.updated", "node.deleted",
  "user", "user.created", "user.updated", "user.deleted",
  "apikey", "apikey.created", "apikey.revoked",
  "auth", "auth.login", "auth.failed",
  "access.denied", "audit.pruned",
];

const FILTERS = ["action", "user", "agent", "since", "until"] as const;

/** "2026-11-23T10:00" (datetime-local, local time) ⇄ RFC 3339. */
const toLocalInput = (iso: string) => {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
};
const fromLocalInput = (v: string) => (v ? new Date(v).toISOString() : "");

function summary(r: AuditRecord): string {
  const d = r.detail;
  if (!d || typeof d !== "object") return "";
  return Object.entries(d)
    .filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : String(v)}`)
    .join("  ");
}

export const auditPage: Page = (root, ctx) => {
  ctx.title("Audit");
  const q = ctx.query;
  const limit = Math.min(1000, Math.max(1, Number(q.get("limit")) || 50));
  const before = q.get("before");
  const filters: Record<string, string> = {};
  for (const f of FILTERS) filters[f] = q.get(f) ?? "";

  const action = h("input", { class: "input", id: "audit-action", type: "text", value: filters.action, placeholder: "any", title: "An action, or a prefix: session matches every session.*", attrs: { list: "audit-actions", autocomplete: "off" } });
  const user = h("input", { class: "input", id: "audit-user", type: "text", value: filters.user, placeholder: "any", attrs: { autocomplete: "off" } });
  const agent = h("input", { class: "input", id: "audit-agent", type: "text", value: filters.agent, placeholder: "any", attrs: { autocomplete: "off" } });
  const since = h("input", { class: "input", id: "audit-since", type: "datetime-local", value: filters.since ? toLocalInput(filters.since) : "" });
  const until = h("input", { class: "input", id: "audit-until", type: "datetime-local", value: filters.until ? toLocalInput(filters.until) : "" });
  const size = h(
    "select",
    { class: "input", aria: { label: "Records per page" } },
    [50, 100, 200, 500].map((n) => h("option", { value: String(n), text: String(n) })),
  );
  size.value = String(limit);

  const go = (extra: Record<string, string | number | null> = {}) => {
    const params = {
      action: action.value.trim(),
      user: user.value.trim(),
      agent: agent.value.trim(),
      since: fromLocalInput(since.value),
      until: fromLocalInput(until.value),
      limit: size.value === "50" ? null : size.value,
      ...extra,
    };
    navigate("#/audit" + query(params));
  };
  const form = h(
    "form",
    { class: "filters" },
    h("label", { class: "field" }, h("span", { text: "Action" }), action),
    h("datalist", { id: "audit-actions" }, ACTIONS.map((a) => h("option", { value: a }))),
    h("label", { class: "field" }, h("span", { text: "User" }), user),
    h("label", { class: "field" }, h("span", { text: "Agent" }), agent),
    h("label", { class: "field field-wide" }, h("span", { text: "Since" }), since),
    h("label", { class: "field field-wide" }, h("span", { text: "Until" }), until),
    h("label", { class: "field field-narrow" }, h("span", { text: "Per page" }), size),
    h(
      "div",
      { class: "filter-buttons" },
      h("button", { class: "btn btn-primary", type: "submit", text: "Apply" }),
      h("button", { class: "btn btn-ghost", type: "button", text: "Reset", on: { click: () => navigate("#/audit") } }),
    ),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go();
  });

  const exportQuery = query({ action: filters.action, user: filters.user, agent: filters.agent, since: filters.since, until: filters.until });
  const exportLink = h("a", { class: "btn", id: "audit-export", href: "/api/v1/audit/export" + exportQuery, text: "Export NDJSON", attrs: { download: "gatekey-audit.ndjson" } });
  const verify = h("div", { class: "verify", id: "audit-verify" }, h("span", { class: "spinner spinner-sm" }), h("span", { class: "muted", text: "Verifying the chain…" }));
  const body = h("div", { class: "card-body" }, stateBlock("loading", "Loading records…"));
  const pager = h("div", { class: "pager" });

  replace(
    root,
    h(
      "div",
      { class: "page" },
      h("div", { class: "page-head" }, h("h1", { text: "Audit log" }), verify, h("span", { class: "spacer" }), exportLink),
      h("section", { class: "card" }, form, body, pager),
    ),
  );

  let left = false;
  get<AuditVerify>("/api/v1/audit/verify").then(
    (v) => {
      if (left) return;
      verify.dataset.ok = String(v.ok);
      replace(
        verify,
        h("span", { class: `badge ${v.ok ? "badge-ok" : "badge-err"}`, text: v.ok ? "Chain verified" : "Chain broken" }),
        h("span", {
          class: "muted",
          text: v.ok
            ? `${v.records} records${v.last_seq ? `, seq ${v.first_seq}–${v.last_seq}` : ""}${v.head_hash ? `, head ${v.head_hash.slice(0, 12)}…` : ""}`
            : `${v.problem ?? "mismatch"} (from seq ${v.first_bad_seq ?? "?"})`,
          title: v.head_hash ?? "",
        }),
      );
    },
    (e) => {
      if (left) return;
      replace(verify, h("span", { class: "badge badge-err", text: "Not verified" }), h("span", { class: "muted", text: (e as Error).message }));
    },
  );

  get<AuditPage>("/api/v1/audit" + query({ ...filters, limit, before })).then(
    (page) => {
      if (left) return;
      if (page.items.length === 0) {
        replace(body, stateBlock("empty", before ? "No older records" : "No records match", "Change or reset the filters."));
      } else {
        const rows: HTMLElement[] = [];
        for (const r of page.items) {
          const more = h("tr", { class: "detail-row" }, h("td", { attrs: { colspan: "7" } }, h("pre", { class: "json", text: JSON.stringify(r, null, 2) })));
          more.hidden = true;
          const row = h(
            "tr",
            { class: "clickable", data: { seq: String(r.seq), action: r.action }, title: "Show the whole record", tabindex: "0" },
            h("td", { class: "mono col-seq", text: String(r.seq) }),
            h("td", { class: "nowrap", text: localTime(r.time), title: r.time }),
            h("td", null, h("span", { class: "mono strong", text: r.action })),
            h("td", null, h("span", { class: `badge ${r.outcome === "ok" ? "badge-ok" : r.outcome === "denied" ? "badge-warn" : "badge-err"}`, text: r.outcome })),
            h("td", { text: r.user ?? "—" }),
            h("td", { class: "col-agent", text: r.agent ?? "—" }),
            h("td", { class: "col-detail" }, h("div", { class: "mono detail truncate", text: summary(r) })),
          );
          const toggle = () => {
            more.hidden = !more.hidden;
            row.classList.toggle("open", !more.hidden);
          };
          row.addEventListener("click", toggle);
          row.addEventListener("keydown", (ev) => {
            if (ev.key === "Enter" || ev.key === " ") {
              ev.preventDefault();
              toggle();
            }
          });
          rows.push(row, more);
        }
        replace(
          body,
          h(
            "div",
            { class: "table-wrap" },
            h(
              "table",
              { class: "table table-audit", id: "audit-table" },
              h(
                "thead",
                null,
                h(
                  "tr",
                  null,
                  h("th", { class: "col-seq", text: "Seq" }),
                  h("th", { text: "Time" }),
                  h("th", { text: "Action" }),
                  h("th", { text: "Outcome" }),
                  h("th", { text: "User" }),
                  h("th", { class: "col-agent", text: "Agent" }),
                  h("th", { class: "col-detail", text: "Detail" }),
                ),
              ),
              h("tbody", null, rows),
            ),
          ),
        );
      }
      const first = page.items[0]?.seq;
      const last = page.items[page.items.length - 1]?.seq;
      replace(
        pager,
        h("span", { class: "muted", text: page.items.length ? `seq ${first}–${last}` : "" }),
        h("span", { class: "spacer" }),
        before ? h("button", { class: "btn btn-sm", type: "button", text: "Newest", on: { click: () => go({ before: null }) } }) : null,
        h("button", {
          class: "btn btn-sm",
          type: "button",
          id: "audit-older",
          text: "Older →",
          disabled: page.next_before === null,
          on: { click: () => page.next_before !== null && go({ before: page.next_before }) },
        }),
      );
    },
    (e) => !left && replace(body, stateBlock("error", "Could not load the audit log", (e as Error).message)),
  );

  return () => {
    left = true;
  };
};
