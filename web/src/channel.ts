// The admin stream protocol (docs/protocol.md §2): Kubernetes'
// v5.channel.k8s.io framing over a WebSocket. Every binary message starts
// with its channel byte.

export const STDIN = 0;
export const STDOUT = 1;
export const STDERR = 2;
export const STATUS = 3;
export const RESIZE = 4;
export const CLOSE = 255;
export const PROTOCOL = "v5.channel.k8s.io";

/** The Kubernetes `Status` that ends a stream (channel 3). */
export interface Status {
  status: "Success" | "Failure";
  reason?: string;
  message?: string;
  details?: { causes?: { reason: string; message: string }[] };
}

export interface StreamHandlers {
  onOpen?: () => void;
  onOutput?: (channel: typeof STDOUT | typeof STDERR, data: Uint8Array) => void;
  /** The socket closed; `status` is what came on channel 3, if anything; `opened` whether it ever opened. */
  onClose?: (status: Status | null, ev: CloseEvent, opened: boolean) => void;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** One admin stream. */
export class ChannelStream {
  readonly ws: WebSocket;
  private status: Status | null = null;
  private opened = false;
  private closedByUs = false;

  constructor(url: string, private readonly h: StreamHandlers) {
    this.ws = new WebSocket(url, [PROTOCOL]);
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => {
      this.opened = true;
      this.h.onOpen?.();
    };
    this.ws.onmessage = (ev: MessageEvent) => {
      if (!(ev.data instanceof ArrayBuffer) || ev.data.byteLength === 0) return;
      const bytes = new Uint8Array(ev.data);
      const ch = bytes[0];
      const data = bytes.subarray(1);
      if (ch === STDOUT || ch === STDERR) {
        this.h.onOutput?.(ch, data);
      } else if (ch === STATUS) {
        try {
          this.status = JSON.parse(decoder.decode(data)) as Status;
        } catch {
          this.status = { status: "Failure", reason: "BadStatus", message: decoder.decode(data) };
        }
      }
    };
    this.ws.onclose = (ev: CloseEvent) => this.h.onClose?.(this.status, ev, this.opened);
    // Errors are followed by a close event, which says everything we know.
    this.ws.onerror = () => {};
  }

  get isOpen(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  /** Whether close() was called here. */
  get closedLocally(): boolean {
    return this.closedByUs;
  }

  send(channel: number, data: Uint8Array | string): void {
    if (!this.isOpen) return;
    const body = typeof data === "string" ? encoder.encode(data) : data;
    const msg = new Uint8Array(body.length + 1);
    msg[0] = channel;
    msg.set(body, 1);
    this.ws.send(msg);
  }

  resize(cols: number, rows: number): void {
    this.send(RESIZE, JSON.stringify({ Width: cols, Height: rows }));
  }

  close(): void {
    this.closedByUs = true;
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000);
  }
}

/** The exit code in a status: 0 for Success, the ExitCode cause otherwise. */
export function exitCode(s: Status | null): number | null {
  if (!s) return null;
  if (s.status === "Success") return 0;
  const c = s.details?.causes?.find((c) => c.reason === "ExitCode");
  return c ? Number(c.message) : null;
}

export function signalOf(s: Status | null): number | null {
  const c = s?.details?.causes?.find((c) => c.reason === "Signal");
  return c ? Number(c.message) : null;
}

/** What ended a session, in words, from its status and close event. */
export function describeEnd(s: Status | null, ev: CloseEvent | null): { title: string; detail: string } {
  if (!s) {
    const code = ev ? ` (WebSocket close ${ev.code}${ev.reason ? ": " + ev.reason : ""})` : "";
    return { title: "Connection lost", detail: "The connection to the control plane ended without a status" + code + "." };
  }
  if (s.status === "Success") return { title: "Exited", detail: "The process exited with code 0." };
  switch (s.reason) {
    case "NonZeroExitCode": {
      const sig = signalOf(s);
      return {
        title: "Exited",
        detail: sig !== null ? `The process was killed by signal ${sig}.` : `The process exited with code ${exitCode(s)}.`,
      };
    }
    case "SessionTakenOver":
      return { title: "Taken over", detail: s.message ?? "Another user took over this console." };
    case "SessionKilled":
      return { title: "Killed", detail: s.message ?? "An administrator killed this session." };
    case "IdleTimeout":
      return { title: "Idle timeout", detail: s.message ?? "The session was idle for too long." };
    case "MaxDurationExceeded":
      return { title: "Time limit", detail: s.message ?? "The session reached its maximum duration." };
    case "Timeout":
      return { title: "Timed out", detail: s.message ?? "The command timed out." };
    case "ServiceUnavailable":
      return { title: "Agent lost", detail: s.message ?? "The agent went away." };
    default:
      return { title: s.reason ?? "Failed", detail: s.message ?? "The session ended." };
  }
}
