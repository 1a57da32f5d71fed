// The control plane's REST API (docs/api.md). The browser is signed in by
// the HttpOnly `gatekey_session` cookie; every request sends it.

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export interface User {
  id: string;
  name: string;
  role: Role;
  scopes: string[];
  has_password: boolean;
}
export type Role = "admin" | "operator" | "viewer";
export interface Whoami {
  user: User;
  key: { id: string; name: string; kind: string; expires_at: string | null };
  via: "api_key" | "cookie";
}

export type NodeType = "gateway" | "hub" | "spoke" | "device";
export interface Agent {
  id: string;
  name: string;
  type: NodeType;
  connected: boolean;
  connected_at: string | null;
  last_seen: string | null;
  remote_addr: string | null;
  version: string | null;
  hostname: string | null;
  session_enabled: boolean;
  session_enabled_agent: boolean | null;
  session_enabled_control_plane: boolean;
}

export interface Participant {
  user: string;
  mode: "interactive" | "observe";
  remote_addr: string | null;
  joined_at: string;
}
export interface LiveSession {
  id: string;
  agent: string;
  agent_id: string;
  kind: "exec" | "console";
  mode: "exclusive" | "shared";
  command?: string | null;
  users: string[];
  participants: Participant[];
  started_at: string;
  bytes_in: number;
  bytes_out: number;
}

export interface AuditRecord {
  seq: number;
  time: string;
  action: string;
  outcome: "ok" | "denied" | "failed";
  user: string | null;
  remote_addr: string | null;
  agent: string | null;
  session_id: string | null;
  detail: Record<string, unknown> | null;
  hash: string;
}
export interface AuditPage {
  items: AuditRecord[];
  next_before: number | null;
}
export interface AuditVerify {
  ok: boolean;
  records: number;
  first_seq: number | null;
  last_seq: number | null;
  head_hash: string | null;
  first_bad_seq?: number;
  problem?: string;
}

export interface ToolInfo {
  name: string;
  description: string;
}
export interface LocationInfo {
  location: string;
  label: string;
  type?: NodeType;
  id?: string;
  name?: string;
}

/** Called when the sign-in is gone (401 on a normal request). */
let onSignedOut: (message: string) => void = () => {};
export function setSignedOutHandler(f: (message: string) => void): void {
  onSignedOut = f;
}

async function errorOf(r: Response): Promise<ApiError> {
  let code = "http_" + r.status;
  let message = `${r.status} ${r.statusText}`;
  try {
    const body = (await r.json()) as { code?: string; message?: string };
    code = body.code ?? code;
    message = body.message ?? message;
  } catch {
    // Not JSON: keep the status line.
  }
  return new ApiError(r.status, code, message);
}

/** Sends a request; resolves with the raw response when it is 2xx. */
export async function request(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
  let r: Response;
  try {
    r = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: body === undefined ? { accept: "application/json" } : { "content-type": "application/json", accept: "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (signal?.aborted) throw e;
    throw new ApiError(0, "network", "cannot reach the control plane: " + String((e as Error).message ?? e));
  }
  if (!r.ok) {
    const e = await errorOf(r);
    if (r.status === 401 && path !== "/api/v1/login") onSignedOut(e.message);
    throw e;
  }
  return r;
}

export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const r = await request(method, path, body);
  if (r.status === 204) return undefined as T;
  return (await r.json()) as T;
}

export const get = <T>(path: string): Promise<T> => api<T>("GET", path);

/** Query string from the non-empty values. */
export function query(params: Record<string, string | number | boolean | null | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? "?" + s : "";
}

/** The WebSocket URL for an API path on this control plane. */
export function wsUrl(path: string): string {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}

/** The API path of a node type (PATCH {path}/{ref} toggles the switch). */
export function nodePath(t: NodeType): string {
  return { gateway: "/api/v1/gateways", hub: "/api/v1/mesh/hubs", spoke: "/api/v1/mesh/spokes", device: "/api/v1/devices" }[t];
}

// What a role may do, as the server decides it (authz.rs); the UI only
// hides what would be refused anyway.
export const can = {
  operate: (r: Role) => r === "admin" || r === "operator",
  manageNodes: (r: Role) => r === "admin",
  readAudit: (r: Role) => r === "admin" || r === "viewer",
};

export const enc = encodeURIComponent;
