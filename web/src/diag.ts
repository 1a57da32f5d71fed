// The human rendering of troubleshooting events, as the CLI prints them
// (crates/gatekey-diag/src/event.rs `Event::text()`): iputils, nslookup,
// traceroute, nc and nmap style.

type Json = Record<string, unknown>;
const str = (v: unknown): string => (v === null || v === undefined ? "" : String(v));
const num = (v: unknown): number => (typeof v === "number" ? v : Number(v ?? 0));

/** iputils' precision: 3 decimals under 1 ms, 2 under 10, 1 under 100, none above. */
export function pingMs(ms: number): string {
  if (ms >= 99.95) return ms.toFixed(0);
  if (ms >= 9.995) return ms.toFixed(1);
  if (ms >= 1) return ms.toFixed(2);
  return ms.toFixed(3);
}

/** printf's `%.Ng`: `digits` significant digits, trailing zeros dropped. */
export function significant(v: number, digits: number): string {
  if (v === 0 || !Number.isFinite(v)) return "0";
  const magnitude = Math.floor(Math.log10(Math.abs(v)));
  const decimals = Math.max(0, digits - 1 - magnitude);
  const s = v.toFixed(decimals);
  return s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
}

const plural = (n: number, one: string, many: string) => (n === 1 ? one : many);

const SERVICES: Record<number, string> = {
  21: "ftp", 22: "ssh", 23: "telnet", 25: "smtp", 53: "domain", 80: "http", 110: "pop3", 111: "rpcbind",
  123: "ntp", 135: "msrpc", 139: "netbios-ssn", 143: "imap", 179: "bgp", 389: "ldap", 443: "https",
  445: "microsoft-ds", 465: "smtps", 514: "shell", 587: "submission", 636: "ldaps", 853: "domain-s",
  993: "imaps", 995: "pop3s", 1194: "openvpn", 1723: "pptp", 2049: "nfs", 2379: "etcd-client",
  3306: "mysql", 3389: "ms-wbt-server", 4222: "nats", 5432: "postgresql", 5672: "amqp", 5900: "vnc",
  6379: "redis", 6443: "kubernetes", 8080: "http-proxy", 8443: "https-alt", 9090: "zeus-admin",
  9100: "jetdirect", 27017: "mongod", 51820: "wireguard",
};

/** Splits "1.2.3.4:80" or "[::1]:80" into address and port. */
function splitAddr(a: string): [string, number] {
  const i = a.lastIndexOf(":");
  const ip = a.slice(0, i).replace(/^\[|\]$/g, "");
  return [ip, Number(a.slice(i + 1))];
}

function dnsRecord(name: string, r: Json): string {
  switch (r.type) {
    case "A":
    case "AAAA":
      return `Name:\t${name}\nAddress: ${str(r.address)}`;
    case "CNAME":
      return `${name}\tcanonical name = ${str(r.target)}`;
    case "MX":
      return `${name}\tmail exchanger = ${str(r.preference)} ${str(r.exchange)}`;
    case "TXT":
      return `${name}\ttext = ${((r.strings as string[]) ?? []).map((s) => `"${s}"`).join(" ")}`;
    case "NS":
      return `${name}\tnameserver = ${str(r.nameserver)}`;
    case "SOA":
      return `${name}\n\torigin = ${str(r.mname)}\n\tmail addr = ${str(r.rname)}\n\tserial = ${str(r.serial)}\n\trefresh = ${str(r.refresh)}\n\tretry = ${str(r.retry)}\n\texpire = ${str(r.expire)}\n\tminimum = ${str(r.minimum)}`;
    case "PTR":
      return `${name}\tname = ${str(r.name)}`;
    default:
      return `${name}\t${str(r.rtype)} = ${str(r.data)}`;
  }
}

function hostReport(e: Json): string {
  const addr = str(e.addr);
  let s = e.name ? `Nmap scan report for ${str(e.name)} (${addr})` : `Nmap scan report for ${addr}`;
  if (e.up && typeof e.latency_ms === "number") s += `\nHost is up (${significant(e.latency_ms / 1000, 2)}s latency).`;
  else if (e.up) s += "\nHost is up.";
  else s += "\nHost seems down (no port answered).";
  for (const n of (e.not_shown as Json[]) ?? []) {
    s += `\nNot shown: ${num(n.count)} ${str(n.state)} tcp ${plural(num(n.count), "port", "ports")} (${str(n.reason)})`;
  }
  const ports = (e.ports as Json[]) ?? [];
  if (ports.length === 0) return s;
  const cells = ports.map((p) => [`${num(p.port)}/tcp`, str(p.state), SERVICES[num(p.port)] ?? "unknown"]);
  const wPort = Math.max(4, ...cells.map((c) => c[0].length)) + 1;
  const wState = Math.max(5, ...cells.map((c) => c[1].length)) + 1;
  s += `\n${"PORT".padEnd(wPort)}${"STATE".padEnd(wState)}SERVICE`;
  for (const [port, state, service] of cells) s += `\n${port.padEnd(wPort)}${state.padEnd(wState)}${service}`;
  return s;
}

/** One event as text: one or more lines, no trailing newline. */
export function eventText(e: Json): string {
  switch (e.event) {
    case "ping_start": {
      const addr = str(e.addr);
      return addr.includes(":")
        ? `PING ${str(e.host)} (${addr}) ${num(e.size)} data bytes`
        : `PING ${str(e.host)} (${addr}) ${num(e.size)}(${num(e.size) + 28}) bytes of data.`;
    }
    case "ping_reply": {
      let s = `${num(e.bytes)} bytes from ${str(e.from)}: icmp_seq=${num(e.seq)}`;
      if (e.ttl !== undefined && e.ttl !== null) s += ` ttl=${num(e.ttl)}`;
      s += ` time=${pingMs(num(e.rtt_ms))} ms`;
      if (e.duplicate) s += " (DUP!)";
      return s;
    }
    case "ping_error":
      return e.from ? `From ${str(e.from)} icmp_seq=${num(e.seq)} ${str(e.message)}` : `ping: ${str(e.message)} (icmp_seq=${num(e.seq)})`;
    case "ping_timeout":
      return `no answer yet for icmp_seq=${num(e.seq)}`;
    case "ping_summary": {
      let s = `--- ${str(e.host)} ping statistics ---\n${num(e.transmitted)} packets transmitted, ${num(e.received)} received, `;
      if (num(e.duplicates) > 0) s += `+${num(e.duplicates)} duplicates, `;
      if (num(e.errors) > 0) s += `+${num(e.errors)} errors, `;
      s += `${significant(num(e.loss_percent), 6)}% packet loss, time ${num(e.time_ms)}ms`;
      const r = e.rtt as Json | undefined;
      if (r) s += `\nrtt min/avg/max/mdev = ${[r.min_ms, r.avg_ms, r.max_ms, r.mdev_ms].map((v) => num(v).toFixed(3)).join("/")} ms`;
      return s;
    }
    case "dns_server":
      return `Server:\t\t${str(e.server)}\nAddress:\t${str(e.server)}#${num(e.port)}`;
    case "dns_answer":
      return dnsRecord(str(e.name), (e.record as Json) ?? {});
    case "dns_error":
      switch (e.status) {
        case "nxdomain":
          return `** server can't find ${str(e.name)}: NXDOMAIN`;
        case "servfail":
          return `** server can't find ${str(e.name)}: SERVFAIL`;
        case "refused":
          return `** server can't find ${str(e.name)}: REFUSED`;
        case "no_answer":
          return `*** Can't find ${str(e.name)}: No answer`;
        case "timeout":
          return ";; connection timed out; no servers could be reached";
        default:
          return `** server can't find ${str(e.name)}: ${str(e.message)}`;
      }
    case "trace_start":
      return `traceroute to ${str(e.host)} (${str(e.addr)}), ${num(e.max_hops)} hops max, ${num(e.packet_bytes)} byte packets`;
    case "hop": {
      let s = `${String(num(e.ttl)).padStart(2)} `;
      let last: string | null = null;
      for (const p of (e.probes as Json[]) ?? []) {
        if (!p.addr) {
          s += " *";
          if (p.annotation) s += ` ${str(p.annotation)}`;
          continue;
        }
        const addr = str(p.addr);
        if (last !== addr) {
          s += p.name ? ` ${str(p.name)} (${addr})` : ` ${addr}`;
          last = addr;
        }
        if (typeof p.rtt_ms === "number") s += `  ${p.rtt_ms.toFixed(3)} ms`;
        if (p.annotation) s += ` ${str(p.annotation)}`;
      }
      return s;
    }
    case "connect": {
      const [ip, port] = splitAddr(str(e.addr));
      const host = str(e.host).replace(/^\[|\]$/g, "");
      const who = host === ip ? ip : `${str(e.host)} (${ip})`;
      const t = pingMs(num(e.time_ms));
      switch (e.state) {
        case "open":
          return `Connection to ${who} ${port} port [tcp/${SERVICES[port] ?? "*"}] succeeded! (${t} ms)`;
        case "refused":
          return `nc: connect to ${who} port ${port} (tcp) failed: Connection refused (${t} ms)`;
        case "timeout":
          return `nc: connect to ${who} port ${port} (tcp) timed out after ${t} ms`;
        default:
          return `nc: connect to ${who} port ${port} (tcp) failed: ${str(e.error) || "error"} (${t} ms)`;
      }
    }
    case "banner":
      if (num(e.bytes) === 0) return e.closed ? "no banner: the service closed the connection" : "no banner received";
      return e.truncated ? `banner: ${str(e.text)} (first ${num(e.bytes)} bytes)` : `banner: ${str(e.text)}`;
    case "scan_start":
      return `Scanning ${str(e.target)} (${num(e.hosts)} ${plural(num(e.hosts), "host", "hosts")}, ${num(e.ports)} ${plural(num(e.ports), "port", "ports")}, ${num(e.probes)} TCP connect probes)`;
    case "port_open":
      return `Discovered open port ${num(e.port)}/tcp on ${str(e.addr)}`;
    case "host_report":
      return hostReport(e);
    case "scan_summary":
      return `Nmap done: ${num(e.addresses)} IP ${plural(num(e.addresses), "address", "addresses")} (${num(e.hosts_up)} ${plural(num(e.hosts_up), "host", "hosts")} up) scanned in ${(num(e.elapsed_ms) / 1000).toFixed(2)} seconds`;
    default:
      return JSON.stringify(e);
  }
}
