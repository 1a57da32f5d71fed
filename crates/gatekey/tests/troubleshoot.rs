//! Troubleshooting through a real control plane and a real agent, on
//! loopback targets the test opens itself: the same tools from the control
//! plane and from an agent, streamed JSON lines, validation before anything
//! is sent, roles and scopes, the audit record, and the CLI. The tools
//! themselves are tested against a namespace topology in gatekey-diag.

mod common;

use std::net::TcpListener;

use gatekey::testkit::Cluster;
use serde_json::{Value, json};

use common::{bins, stderr, stdout};

async fn run(c: &Cluster, key: &str, location: &str, request: Value) -> (u16, Vec<Value>) {
    let r = c
        .send(
            "POST",
            &format!("/api/v1/troubleshoot?location={location}"),
            key,
            request,
        )
        .await;
    if r.status != 200 {
        return (r.status, vec![r.json()]);
    }
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (200, lines)
}

fn last(lines: &[Value]) -> &Value {
    lines.last().expect("at least the result line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_run_from_the_control_plane_and_from_an_agent() {
    let c = Cluster::start(&bins());
    let (hub, _agent) = c.agent("mesh hub", "hub-1", true);
    let open = TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for location in ["control-plane", "hub:hub-1", &format!("hub:{}", hub.id)] {
        let (status, lines) = run(
            &c,
            &c.admin_key,
            location,
            json!({"tool": "nc", "host": "127.0.0.1", "port": open_port, "timeout_ms": 2000}),
        )
        .await;
        assert_eq!(status, 200, "{lines:?}");
        assert!(lines.iter().any(|l| l["event"] == "connect"), "{lines:?}");
        assert_eq!(last(&lines)["event"], "result", "{lines:?}");
        assert_eq!(last(&lines)["success"], true, "{location}: {lines:?}");

        let (_, lines) = run(
            &c,
            &c.admin_key,
            location,
            json!({"tool": "nc", "host": "127.0.0.1", "port": closed_port}),
        )
        .await;
        assert_eq!(last(&lines)["success"], false, "{lines:?}");

        let (_, lines) = run(
            &c,
            &c.admin_key,
            location,
            json!({"tool": "nmap", "host": "127.0.0.1", "ports": format!("{open_port},{closed_port}")}),
        )
        .await;
        let text = serde_json::to_string(&lines).unwrap();
        assert!(text.contains("\"port_open\""), "{text}");
        assert_eq!(last(&lines)["success"], true, "{text}");

        let (_, lines) = run(
            &c,
            &c.admin_key,
            location,
            json!({"tool": "ping", "host": "127.0.0.1", "count": 2, "interval_ms": 200}),
        )
        .await;
        let result = last(&lines);
        // Ping needs ICMP sockets; where the machine allows neither kind the
        // run reports which privilege to grant.
        if result["event"] == "error" {
            assert!(
                result["message"]
                    .as_str()
                    .unwrap()
                    .contains("ping_group_range"),
                "{result}"
            );
        } else {
            assert_eq!(result["success"], true, "{lines:?}");
            assert_eq!(
                lines.iter().filter(|l| l["event"] == "ping_reply").count(),
                2,
                "{lines:?}"
            );
        }
    }

    // The audit log has each run: who, tool, arguments, location, result.
    let r = c
        .get("/api/v1/audit?action=troubleshoot&limit=100", &c.admin_key)
        .await;
    let items = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 12, "{items:?}");
    assert!(items.iter().any(|i| i["agent"] == "hub-1"
        && i["detail"]["tool"] == "nmap"
        && i["detail"]["location"] == "hub:hub-1"
        && i["user"] == "admin"));
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_locations_and_roles_are_checked_first() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    c.create_node("mesh spoke", "spoke-1");
    let cases = [
        (
            json!({"tool": "nc", "host": "-oProxyCommand=x", "port": 22}),
            "host",
        ),
        (json!({"tool": "nc", "host": "db", "port": 0}), "port"),
        (json!({"tool": "nc", "host": "db", "port": 70000}), "port"),
        (json!({"tool": "ping", "host": "a b"}), "host"),
        (
            json!({"tool": "ping", "host": "10.0.0.1", "count": 100000}),
            "count",
        ),
        (
            json!({"tool": "nmap", "host": "10.0.0.0/24", "ports": "1-1000"}),
            "limit of 1024",
        ),
        (
            json!({"tool": "traceroute", "host": "x", "max_hops": 500}),
            "max-hops",
        ),
        (json!({"tool": "rm", "host": "x"}), "tool"),
    ];
    for (req, arg) in cases {
        let (status, body) = run(&c, &c.admin_key, "control-plane", req.clone()).await;
        assert_eq!(status, 400, "{req}: {body:?}");
        let m = body[0]["message"].as_str().unwrap();
        assert!(m.contains(arg), "{req}: {m}");
    }
    let nc = json!({"tool": "nc", "host": "127.0.0.1", "port": 9});
    let (status, body) = run(&c, &c.admin_key, "router:x", nc.clone()).await;
    assert_eq!(status, 400, "{body:?}");
    let (status, _) = run(&c, &c.admin_key, "hub:nope", nc.clone()).await;
    assert_eq!(status, 404);
    let (status, _) = run(&c, &c.admin_key, "spoke:spoke-1", nc.clone()).await;
    assert_eq!(status, 503);

    let viewer = c.user_with_key("view", "viewer", &[]).await;
    let (status, _) = run(&c, &viewer, "control-plane", nc.clone()).await;
    assert_eq!(status, 403);
    let op = c.user_with_key("op", "operator", &["hub:*"]).await;
    let (status, body) = run(&c, &op, "control-plane", nc.clone()).await;
    assert_eq!(
        status, 403,
        "an operator scoped to hubs may not use the control plane: {body:?}"
    );
    let (status, _) = run(&c, &op, "hub:hub-1", nc.clone()).await;
    assert_eq!(status, 200);

    // The list shows each caller only where it may run tools.
    let list = c.get("/api/v1/troubleshoot", &op).await.json();
    let locs: Vec<&str> = list["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["location"].as_str().unwrap())
        .collect();
    assert_eq!(locs.len(), 1, "{list}");
    assert!(locs[0].starts_with("hub:"), "{list}");
    let list = c.get("/api/v1/troubleshoot", &c.admin_key).await.json();
    assert_eq!(list["tools"].as_array().unwrap().len(), 5);
    assert_eq!(list["locations"][0]["location"], "control-plane");
}

#[test]
fn the_cli_runs_the_documented_commands() {
    let c = Cluster::start(&bins());
    let (hub, _agent) = c.agent("mesh hub", "hub-1", true);
    let open = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = open.local_addr().unwrap().port().to_string();

    let out = c.admin_run(&["troubleshoot", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "Available Tools:",
        "  ping         - Test ICMP connectivity to a host",
        "  nslookup     - Perform DNS lookup for a hostname",
        "  traceroute   - Trace the route to a host",
        "  nc           - Test TCP connectivity to a port",
        "  nmap         - Scan ports on a host",
        "Execution Locations:",
        "  control-plane                  (Control Plane)",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains(&format!("hub:{}", hub.id)) && text.contains("(Hub: hub-1)"),
        "{text}"
    );

    let out = c.admin_run(&["troubleshoot", "nc", "127.0.0.1", "--port", &port]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));
    let loc = format!("hub:{}", hub.id);
    let out = c.admin_run(&[
        "troubleshoot",
        "nc",
        "127.0.0.1",
        "--port",
        &port,
        "--location",
        &loc,
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = c.admin_run(&[
        "troubleshoot",
        "nmap",
        "127.0.0.1",
        "--ports",
        &port,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["result"]["success"], true, "{v}");
    drop(open);
    // The port is closed now: exit code 1, not an error code.
    let out = c.admin_run(&["troubleshoot", "nc", "127.0.0.1", "--port", &port]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = c.admin_run(&["troubleshoot", "nc", "127.0.0.1", "--port", "0"]);
    assert_eq!(out.status.code(), Some(251), "{}", stderr(&out));
    assert!(stderr(&out).contains("--port"), "{}", stderr(&out));
}
