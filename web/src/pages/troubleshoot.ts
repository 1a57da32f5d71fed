// Network diagnostics from the control plane or an agent: pick a tool,
// target, options and location; the answer streams as JSON lines and is
// rendered as the CLI prints it.

import { type LocationInfo, type ToolInfo, ApiError, get, query, request } from "../api";
import type { Page } from "../app";
import { h, replace, stateBlock } from "../dom";
import { eventText } from "../diag";
import { duration } from "../format";

interface Opt {
  key: string;
  label: string;
  kind: "number" | "text" | "select" | "check";
  placeholder?: string;
  choices?: string[];
}

const OPTIONS: Record<string, Opt[]> = {
  ping: [
    { key: "count", label: "Count", kind: "number", placeholder: "4" },
    { key: "interval_ms", label: "Interval (ms)", kind: "number", placeholder: "1000" },
    { key: "timeout_ms", label: "Timeout (ms)", kind: "number", placeholder: "2000" },
    { key: "size", label: "Size (bytes)", kind: "number", placeholder: "56" },
  ],
  nslookup: [
    { key: "type", label: "Type", kind: "select", choices: ["", "A", "AAAA", "CNAME", "MX", "TXT", "NS", "SOA", "PTR"] },
    { key: "server", label: "Server", kind: "text", placeholder: "system resolver" },
    { key: "timeout_ms", label: "Timeout (ms)", kind: "number", placeholder: "5000" },
  ],
  traceroute: [
    { key: "max_hops", label: "Max hops", kind: "number", placeholder: "30" },
    { key: "queries", label: "Probes per hop", kind: "number", placeholder: "3" },
    { key: "method", label: "Method", kind: "select", choices: ["", "udp", "icmp"] },
    { key: "timeout_ms", label: "Timeout (ms)", kind: "number", placeholder: "3000" },
    { key: "numeric", label: "No names (-n)", kind: "check" },
  ],
  nc: [
    { key: "port", label: "Port", kind: "number", placeholder: "required" },
    { key: "timeout_ms", label: "Timeout (ms)", kind: "number", placeholder: "5000" },
    { key: "banner", label: "Read banner", kind: "check" },
  ],
  nmap: [
    { key: "ports", label: "Ports", kind: "text", placeholder: "22,80,443,8000-8100" },
    { key: "timeout_ms", label: "Timeout (ms)", kind: "number", placeholder: "1000" },
    { key: "concurrency", label: "Concurrency", kind: "number", placeholder: "64" },
  ],
};

const HOST_HINT: Record<string, string> = {
  ping: "10.0.0.1 or a name",
  nslookup: "example.com, or an address for PTR",
  traceroute: "10.0.0.1 or a name",
  nc: "db.internal",
  nmap: "10.0.0.0/28, an address or a name",
};

export const troubleshootPage: Page = (root, ctx) => {
  ctx.title("Troubleshoot");
  const body = h("div", { class: "ts" });
  replace(root, h("div", { class: "page" }, h("div", { class: "page-head" }, h("h1", { text: "Troubleshoot" })), body));
  replace(body, stateBlock("loading", "Loading tools…"));
  let abort: AbortController | null = null;
  let left = false;

  get<{ tools: ToolInfo[]; locations: LocationInfo[] }>("/api/v1/troubleshoot").then(
    ({ tools, locations }) => {
      if (left) return;
      if (locations.length === 0) {
        replace(
          body,
          stateBlock(
            "empty",
            "Nowhere to run tools",
            "No location is open to you: the control plane is outside your scopes and no connected agent in them has sessions enabled.",
          ),
        );
        return;
      }
      build(tools, locations);
    },
    (e) => !left && replace(body, stateBlock("error", "Could not load the tools", (e as Error).message)),
  );

  function build(tools: ToolInfo[], locations: LocationInfo[]): void {
    const location = h(
      "select",
      { class: "input", id: "ts-location", aria: { label: "Location" } },
      locations.map((l) => h("option", { value: l.location, text: l.label })),
    );
    const wanted = ctx.query.get("location");
    if (wanted && locations.some((l) => l.location === wanted)) location.value = wanted;
    const tool = h(
      "select",
      { class: "input", id: "ts-tool", aria: { label: "Tool" } },
      tools.map((t) => h("option", { value: t.name, text: t.name })),
    );
    const toolDesc = h("div", { class: "hint" });
    const host = h("input", { class: "input mono", id: "ts-host", type: "text", attrs: { autocomplete: "off", spellcheck: "false", autocapitalize: "off" } });
    const opts = h("div", { class: "ts-opts" });
    const run = h("button", { class: "btn btn-primary", type: "submit", text: "Run" });
    const stop = h("button", { class: "btn btn-danger", type: "button", text: "Stop", disabled: true });
    const status = h("div", { class: "exec-status", id: "ts-status", aria: { live: "polite" } });
    const output = h("pre", { class: "output", id: "ts-output" });
    const placeholder = h("div", { class: "output-empty", text: "Results stream here, one line per event, as the CLI prints them." });
    const outBox = h("div", { class: "output-box" }, placeholder, output);
    output.hidden = true;
    let inputs = new Map<string, HTMLInputElement | HTMLSelectElement>();

    const showOpts = () => {
      const t = tool.value;
      toolDesc.textContent = tools.find((x) => x.name === t)?.description ?? "";
      host.placeholder = HOST_HINT[t] ?? "";
      inputs = new Map();
      replace(
        opts,
        (OPTIONS[t] ?? []).map((o) => {
          let input: HTMLInputElement | HTMLSelectElement;
          if (o.kind === "select") {
            input = h("select", { class: "input" }, (o.choices ?? []).map((c) => h("option", { value: c, text: c || "default" })));
          } else if (o.kind === "check") {
            input = h("input", { type: "checkbox" });
            inputs.set(o.key, input);
            return h("label", { class: "field field-check" }, input, h("span", { text: o.label }));
          } else {
            input = h("input", { class: "input", type: o.kind === "number" ? "number" : "text", placeholder: o.placeholder ?? "", attrs: o.kind === "number" ? { min: "0" } : {} });
          }
          input.dataset.opt = o.key;
          inputs.set(o.key, input);
          return h("label", { class: "field" }, h("span", { text: o.label }), input);
        }),
      );
    };
    tool.addEventListener("change", showOpts);
    showOpts();

    const line = (text: string, cls = "") => {
      output.append(h("span", { class: `line ${cls}`, text: text + "\n" }));
      outBox.scrollTop = outBox.scrollHeight;
    };
    const setStatus = (kind: "running" | "ok" | "err", label: string, detail = "") => {
      status.dataset.kind = kind;
      replace(
        status,
        kind === "running" ? h("span", { class: "spinner spinner-sm" }) : null,
        h("span", { class: `badge badge-${kind === "ok" ? "ok" : kind === "running" ? "info" : "err"}`, text: label }),
        detail ? h("span", { class: "muted", text: detail }) : null,
      );
    };

    const form = h(
      "form",
      { class: "card ts-form" },
      h(
        "div",
        { class: "ts-row" },
        h("label", { class: "field" }, h("span", { text: "Location" }), location),
        h("label", { class: "field" }, h("span", { text: "Tool" }), tool),
        h("label", { class: "field grow" }, h("span", { text: "Target" }), host),
      ),
      toolDesc,
      opts,
      h("div", { class: "ts-actions" }, run, stop),
    );
    replace(body, form, status, outBox);

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (abort) return;
      const req: Record<string, unknown> = { tool: tool.value, host: host.value.trim() };
      if (!req.host) {
        setStatus("err", "Missing target", "Enter a host, address or network.");
        host.focus();
        return;
      }
      for (const [k, input] of inputs) {
        if (input instanceof HTMLInputElement && input.type === "checkbox") {
          if (input.checked) req[k] = true;
        } else if (input.value.trim() !== "") {
          req[k] = input instanceof HTMLInputElement && input.type === "number" ? Number(input.value) : input.value.trim();
        }
      }
      replace(output);
      output.hidden = false;
      placeholder.hidden = true;
      const where = location.selectedOptions[0]?.textContent ?? location.value;
      setStatus("running", "Running", `${tool.value} ${req.host} from ${where}`);
      run.disabled = true;
      stop.disabled = false;
      const started = performance.now();
      const ctl = new AbortController();
      abort = ctl;
      let ended = false;
      try {
        const r = await request("POST", "/api/v1/troubleshoot" + query({ location: location.value }), req, ctl.signal);
        const reader = r.body!.getReader();
        const dec = new TextDecoder();
        let buf = "";
        const handle = (raw: string) => {
          if (!raw.trim()) return;
          let e: Record<string, unknown>;
          try {
            e = JSON.parse(raw) as Record<string, unknown>;
          } catch {
            line(raw);
            return;
          }
          if (e.event === "result") {
            ended = true;
            const took = duration(performance.now() - started);
            setStatus(e.success ? "ok" : "err", e.success ? "Succeeded" : "Failed", `${String(e.summary ?? "")} · ${took}`);
          } else if (e.event === "error") {
            ended = true;
            line(String(e.message ?? "error"), "line-err");
            setStatus("err", "Could not run", String(e.message ?? ""));
          } else {
            const cls = ["ping_error", "ping_timeout", "dns_error"].includes(String(e.event)) ? "line-warn" : "";
            line(eventText(e), cls);
          }
        };
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            handle(buf.slice(0, i));
            buf = buf.slice(i + 1);
          }
        }
        handle(buf + dec.decode());
        if (!ended) setStatus("err", "Ended early", "The stream closed before the result.");
      } catch (e) {
        if (ctl.signal.aborted) setStatus("err", "Stopped", `after ${duration(performance.now() - started)}`);
        else {
          setStatus("err", e instanceof ApiError && e.status === 400 ? "Invalid request" : "Failed", e instanceof ApiError ? e.message : String(e));
          if (output.childElementCount === 0) {
            output.hidden = true;
            placeholder.hidden = false;
          }
        }
      } finally {
        abort = null;
        run.disabled = false;
        stop.disabled = true;
      }
    });
    stop.addEventListener("click", () => abort?.abort());
  }

  return () => {
    left = true;
    abort?.abort();
  };
};
