//! The seed's documented configuration and commands, exactly as written.

mod common;
use common::*;

/// `session list` output: the documented four columns, a dashes row, one row per agent.
#[test]
fn documented_commands_work_as_written() {
    let c = Cluster::start(&bins());

    // gatekey-admin mesh hub create / mesh spoke create / gateway create
    let hub = c.create_node("mesh hub", "hub-1");
    let spoke: serde_json::Value = serde_json::from_str(&c.admin_ok(&[
        "mesh",
        "spoke",
        "create",
        "spoke-datacenter",
        "--id",
        "spoke-dc",
        "-o",
        "json",
    ]))
    .unwrap();
    let gw: serde_json::Value = serde_json::from_str(&c.admin_ok(&[
        "gateway",
        "create",
        "gateway-west",
        "--id",
        "gw-west",
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(hub.token.starts_with("hub_"));
    assert!(spoke["token"].as_str().unwrap().starts_with("spoke_"));
    assert!(gw["token"].as_str().unwrap().starts_with("gw_"));

    // The documented config files, with the token filled in (and the test CA).
    let hub_cfg = c.agent_config("hub-1", &hub.token, true, "");
    let spoke_cfg = c.agent_config(
        "spoke-datacenter",
        spoke["token"].as_str().unwrap(),
        true,
        "hub_endpoint: hub.example.com:1194\n",
    );
    let gw_cfg = c.agent_config("gateway-west", gw["token"].as_str().unwrap(), true, "");
    let hub_agent = c.spawn_agent(&hub_cfg);
    let spoke_agent = c.spawn_agent(&spoke_cfg);
    let gw_agent = c.spawn_agent(&gw_cfg);
    c.wait_for_agent("hub-1", true, &hub_agent);
    c.wait_for_agent("spoke-datacenter", true, &spoke_agent);
    c.wait_for_agent("gateway-west", true, &gw_agent);

    // gatekey-admin session list
    let list = c.admin_ok(&["session", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 5, "{list}");
    let header: Vec<&str> = lines[0]
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        ["Agent ID", "Type", "Node Name", "Connected"],
        "{list}"
    );
    assert!(lines[1].chars().all(|ch| ch == '-' || ch == ' '), "{list}");
    for (id, ty, name) in [
        (hub.id.as_str(), "hub", "hub-1"),
        ("spoke-dc", "spoke", "spoke-datacenter"),
        ("gw-west", "gateway", "gateway-west"),
    ] {
        let row = lines
            .iter()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{list}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..3], [id, ty, name], "{list}");
        // Connected: YYYY-MM-DD HH:MM:SS
        assert_eq!(cols[3].len(), 10, "{row}");
        assert_eq!(cols[4].len(), 8, "{row}");
    }
    // Every column starts where its header does, on the dashes row and every agent row.
    let starts: Vec<usize> = ["Type", "Node Name", "Connected"]
        .iter()
        .map(|h| lines[0].find(h).unwrap())
        .collect();
    for row in &lines[1..] {
        for &s in &starts {
            let b = row.as_bytes();
            assert!(
                b.len() > s && b[s - 1] == b' ' && b[s] != b' ',
                "misaligned column at {s}:\n{list}"
            );
        }
    }

    // gatekey-admin session exec … — each must behave as the same command run locally.
    for (agent, cmd) in [
        ("hub-1", "ip addr"),
        ("hub-1", "systemctl status openvpn"),
        ("spoke-datacenter", "ping -c 1 127.0.0.1"),
        ("gw-west", "ip route"),
    ] {
        let remote = c.admin_run(&["session", "exec", agent, cmd]);
        let local = local_sh(cmd);
        assert_eq!(
            remote.status.code(),
            local.status.code(),
            "{cmd}: {}",
            stderr(&remote)
        );
        if local.status.success() && cmd != "ping -c 1 127.0.0.1" {
            assert_eq!(stdout(&remote), stdout(&local), "{cmd}");
        }
    }

    // gatekey-admin troubleshoot … [--location TYPE:<id>], with loopback
    // targets standing in for the documented addresses (tests reach nothing else).
    let list = c.admin_ok(&["troubleshoot", "list"]);
    for line in [
        "Available Tools:",
        "  nmap         - Scan ports on a host",
        "Execution Locations:",
        "  control-plane                  (Control Plane)",
        "  gateway:gw-west                (Gateway: gateway-west)",
        "  spoke:spoke-dc                 (Spoke: spoke-datacenter)",
    ] {
        assert!(list.contains(line), "missing {line:?}:\n{list}");
    }
    assert!(list.contains(&format!("hub:{}", hub.id)), "{list}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let hub_loc = format!("hub:{}", hub.id);
    for args in [
        vec!["troubleshoot", "nc", "127.0.0.1", "--port", &port],
        vec![
            "troubleshoot",
            "nc",
            "127.0.0.1",
            "--port",
            &port,
            "--location",
            "gateway:gw-west",
        ],
        vec!["troubleshoot", "nmap", "127.0.0.1", "--ports", &port],
        vec![
            "troubleshoot",
            "nmap",
            "127.0.0.1",
            "--ports",
            &port,
            "--location",
            &hub_loc,
        ],
        vec![
            "troubleshoot",
            "traceroute",
            "127.0.0.1",
            "--location",
            "spoke:spoke-dc",
        ],
    ] {
        let out = c.admin_run(&args);
        assert_code(&out, 0);
    }
    let ping = c.admin_run(&["troubleshoot", "ping", "127.0.0.1", "--location", &hub_loc]);
    assert!(
        ping.status.code() == Some(0) || stderr(&ping).contains("ping_group_range"),
        "{}{}",
        stdout(&ping),
        stderr(&ping)
    );
    // gatekey-admin audit list --action session
    let audit = c.admin_ok(&["audit", "list", "--action", "session"]);
    assert!(audit.contains("session.closed"), "{audit}");

    // gatekey-admin gateway|mesh hub|mesh spoke update <id> --session=…
    c.admin_ok(&["gateway", "update", "gw-west", "--session=true"]);
    c.admin_ok(&["mesh", "hub", "update", &hub.id, "--session=false"]);
    c.admin_ok(&["mesh", "spoke", "update", "spoke-dc", "--session=true"]);
    let refused = c.admin_run(&["session", "exec", "hub-1", "true"]);
    assert_code(&refused, 247);
    assert!(
        stderr(&refused).contains("control plane"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !c.admin_ok(&["session", "list"]).contains("hub-1"),
        "a disabled hub is not listed"
    );
    c.admin_ok(&["mesh", "hub", "update", &hub.id, "--session", "true"]);
    assert_code(&c.admin_run(&["session", "exec", "hub-1", "true"]), 0);

    // -o json / yaml for scripts.
    let json: serde_json::Value =
        serde_json::from_str(&c.admin_ok(&["session", "list", "-o", "json"])).unwrap();
    assert_eq!(
        json.as_array()
            .map(|a| a.len())
            .or_else(|| json["items"].as_array().map(|a| a.len())),
        Some(3),
        "{json}"
    );
    assert!(
        c.admin_ok(&["session", "list", "-o", "yaml"])
            .contains("name: hub-1")
    );
}

/// The documented example configs in deploy/config pass the agent's check.
#[test]
fn documented_config_files_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
    for role in ["gateway", "hub", "spoke"] {
        let out = std::process::Command::new(bins().agent)
            .args([
                "--config",
                root.join(format!("{role}.yaml")).to_str().unwrap(),
                "--check",
            ])
            .output()
            .unwrap();
        assert_code(&out, 0);
    }
}

/// The documented pipe: `tar c . | gatekey-admin session exec hub-1 "tar x -C /tmp/x"`.
#[test]
fn tar_pipe_through_exec() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let src = c.dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(
        src.join("sub/b.bin"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<u8>>(),
    )
    .unwrap();
    let dst = c.dir.join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let mut tar = std::process::Command::new("tar")
        .arg("c")
        .arg(".")
        .current_dir(&src)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = c
        .admin()
        .args([
            "session",
            "exec",
            "hub-1",
            &format!("tar x -C {}", dst.display()),
        ])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert_code(&out, 0);
    assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        std::fs::read(dst.join("sub/b.bin")).unwrap(),
        std::fs::read(src.join("sub/b.bin")).unwrap()
    );
}
