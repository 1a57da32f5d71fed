// Run a command on an agent with live output: the streaming exec
// WebSocket (`/ws/v1/agents/{ref}/exec?metadata=…`), stdout and stderr
// apart, the exit code and the time it took.

import { enc, query, wsUrl } from "./api";
import { ChannelStream, describeEnd, exitCode, signalOf, STDERR } from "./channel";
import { h, replace } from "./dom";
import { duration } from "./format";

/** Most output kept on the page; the rest is counted, not shown. */
const MAX_CHARS = 2 * 1024 * 1024;

export function mountExec(root: HTMLElement, agentName: string): () => void {
  const command = h("input", {
    type: "text",
    class: "input mono",
    id: "exec-command",
    placeholder: "ip addr",
    aria: { label: "Command" },
    attrs: { autocomplete: "off", spellcheck: "false", autocapitalize: "off" },
  });
  const timeout = h("input", { type: "number", class: "input input-num", id: "exec-timeout", value: "60", attrs: { min: "1", max: "86400" }, aria: { label: "Timeout in seconds" } });
  const run = h("button", { class: "btn btn-primary", type: "submit", text: "Run" });
  const stop = h("button", { class: "btn btn-danger", type: "button", text: "Stop", disabled: true });
  const clear = h("button", { class: "btn btn-ghost", type: "button", text: "Clear" });
  const status = h("div", { class: "exec-status", id: "exec-status", aria: { live: "polite" } });
  const output = h("pre", { class: "output", id: "exec-output", tabindex: "0", aria: { label: "Command output" } });
  const placeholder = h("div", { class: "output-empty", text: "Output appears here as the command runs. stderr is marked in red." });
  const outBox = h("div", { class: "output-box" }, placeholder, output);
  output.hidden = true;

  const form = h(
    "form",
    { class: "exec-form" },
    h("label", { class: "field grow" }, h("span", { text: "Command (run by the node's /bin/sh -c)" }), command),
    h("label", { class: "field" }, h("span", { text: "Timeout (s)" }), timeout),
    h("div", { class: "exec-buttons" }, run, stop, clear),
  );
  root.append(h("div", { class: "exec" }, form, status, outBox));

  let stream: ChannelStream | null = null;
  let shown = 0;
  let dropped = 0;
  let started = 0;
  let ticker = 0;
  const decoders = { 1: new TextDecoder(), 2: new TextDecoder() };

  const setStatus = (kind: string, label: string, detail = "") => {
    status.dataset.kind = kind;
    replace(
      status,
      kind === "running" ? h("span", { class: "spinner spinner-sm" }) : null,
      h("span", { class: `badge badge-${kind === "ok" ? "ok" : kind === "running" ? "info" : "err"}`, text: label }),
      detail ? h("span", { class: "muted", text: detail }) : null,
    );
  };

  const write = (ch: 1 | 2, text: string) => {
    if (!text) return;
    if (shown >= MAX_CHARS) {
      dropped += text.length;
      return;
    }
    shown += text.length;
    const last = output.lastElementChild as HTMLElement | null;
    const cls = ch === STDERR ? "stderr" : "stdout";
    if (last && last.className === cls) last.append(text);
    else output.append(h("span", { class: cls, text, title: ch === STDERR ? "stderr" : undefined }));
    const atBottom = outBox.scrollHeight - outBox.scrollTop - outBox.clientHeight < 40;
    if (atBottom) outBox.scrollTop = outBox.scrollHeight;
  };

  const finish = () => {
    window.clearInterval(ticker);
    run.disabled = false;
    stop.disabled = true;
    command.disabled = false;
    stream = null;
  };

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const cmd = command.value.trim();
    if (!cmd || stream) return;
    const secs = Math.max(1, Math.min(86400, Number(timeout.value) || 60));
    replace(output);
    output.hidden = false;
    placeholder.hidden = true;
    shown = 0;
    dropped = 0;
    decoders[1] = new TextDecoder();
    decoders[2] = new TextDecoder();
    run.disabled = true;
    stop.disabled = false;
    started = performance.now();
    setStatus("running", "Starting…");
    const metadata = JSON.stringify({ shell: cmd, timeoutSeconds: secs, stdin: false });
    const s = new ChannelStream(wsUrl(`/ws/v1/agents/${enc(agentName)}/exec` + query({ metadata })), {
      onOpen: () => {
        setStatus("running", "Running", duration(performance.now() - started));
        ticker = window.setInterval(() => setStatus("running", "Running", duration(performance.now() - started)), 500);
      },
      onOutput: (ch, data) => write(ch, decoders[ch].decode(data, { stream: true })),
      onClose: (st, ev, opened) => {
        write(1, decoders[1].decode());
        write(2, decoders[2].decode());
        const took = duration(performance.now() - started);
        const cut = dropped ? ` · ${dropped} more characters not shown` : "";
        if (!opened) setStatus("err", "Not started", "The control plane refused: is the agent connected, with sessions enabled?");
        else if (s.closedLocally) setStatus("err", "Stopped", `after ${took}; the process group was killed${cut}`);
        else if (st?.reason === "Timeout") setStatus("err", "Timed out", `after ${took}: ${st.message ?? ""}${cut}`);
        else {
          const code = exitCode(st);
          const sig = signalOf(st);
          if (code === null) {
            const end = describeEnd(st, ev);
            setStatus("err", end.title, end.detail);
          } else setStatus(code === 0 ? "ok" : "err", sig !== null ? `Exit ${code} (signal ${sig})` : `Exit ${code}`, `in ${took}${cut}`);
        }
        finish();
      },
    });
    stream = s;
  });
  stop.addEventListener("click", () => stream?.close());
  clear.addEventListener("click", () => {
    replace(output);
    output.hidden = true;
    placeholder.hidden = false;
    if (!stream) replace(status);
  });
  requestAnimationFrame(() => command.focus());
  return () => {
    window.clearInterval(ticker);
    stream?.close();
  };
}
