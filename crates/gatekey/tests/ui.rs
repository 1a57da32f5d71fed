//! The web console's server side against a real control plane: the
//! embedded bundle served at `/` and `/ui/` with its content types, caching
//! and security headers (API 404s stay JSON), and the console's sign-in
//! with an API key, which turns the key into the session cookie. The
//! browser tests (web/tests/ui.test.mjs, run by scripts/test.sh) drive the
//! console itself in Chromium.

mod common;

use gatekey::testkit::{Cluster, HttpAnswer, HttpRequest};
use serde_json::json;

use common::bins;

async fn plain_get(c: &Cluster, path: &str, headers: Vec<(&str, String)>) -> HttpAnswer {
    c.http(HttpRequest {
        method: "GET",
        path,
        key: None,
        body: None,
        headers,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_are_served_with_security_headers() {
    let c = Cluster::start(&bins());

    let index = plain_get(&c, "/", vec![]).await;
    assert_eq!(index.status, 200, "{}", index.body);
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(index.body.contains("/ui/app.js"), "{}", index.body);
    assert!(!index.body.contains("<script>"), "no inline script");
    let csp = index.header("content-security-policy").unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-eval"), "{csp}");
    assert!(
        !csp.split(';')
            .any(|d| d.trim().starts_with("script-src") && d.contains("unsafe-inline")),
        "{csp}"
    );
    assert_eq!(index.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(index.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(index.header("x-frame-options"), Some("DENY"));
    assert_eq!(index.header("cache-control"), Some("no-cache"));

    for (path, ty) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let r = plain_get(&c, path, vec![]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some(ty), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert!(r.body.len() > 200, "{path} is too small");
        // Unchanged files are revalidated, not downloaded again.
        let tag = r.header("etag").expect("etag").to_string();
        let again = plain_get(&c, path, vec![("if-none-match", tag.clone())]).await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("etag"), Some(tag.as_str()));
    }
    let js = plain_get(&c, "/ui/app.js", vec![]).await;
    assert!(js.body.contains("v5.channel.k8s.io"));
    assert!(
        plain_get(&c, "/ui/app.css", vec![])
            .await
            .body
            .contains(".xterm"),
        "xterm's stylesheet is bundled"
    );

    // Unknown files and API paths answer with the API's JSON errors.
    for path in ["/ui/nope.js", "/api/v1/nope", "/nope", "/ui/../Cargo.toml"] {
        let r = plain_get(&c, path, vec![]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(r.json()["code"], "not_found", "{path}");
    }
    // The console is public; the API behind it is not.
    assert_eq!(plain_get(&c, "/api/v1/agents", vec![]).await.status, 401);
}

fn login(body: serde_json::Value, origin: Option<String>) -> HttpRequest<'static> {
    HttpRequest {
        method: "POST",
        path: "/api/v1/login",
        key: None,
        body: Some(body.to_string()),
        headers: origin.map(|o| vec![("origin", o)]).unwrap_or_default(),
    }
}

fn cookie_of(r: &HttpAnswer) -> (String, String) {
    let set = r.header("set-cookie").expect("set-cookie").to_string();
    (set.split(';').next().unwrap().to_string(), set)
}

fn max_age(set_cookie: &str) -> Option<u64> {
    set_cookie
        .split(';')
        .filter_map(|a| a.trim().strip_prefix("Max-Age="))
        .find_map(|v| v.parse().ok())
}

async fn audit(c: &Cluster, query: &str) -> Vec<serde_json::Value> {
    let r = c.get(&format!("/api/v1/audit?{query}"), &c.admin_key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_sign_in_with_an_api_key_sets_the_session_cookie() {
    let c = Cluster::start(&bins());
    let origin = format!("https://{}", c.addr);
    let bob = c.user_with_key("bob", "operator", &["hub:*"]).await;

    // The key becomes the cookie as it is: no new key is minted.
    let keys_before = c.get("/api/v1/apikeys", &c.admin_key).await.json()["items"]
        .as_array()
        .unwrap()
        .len();
    let r = c
        .http(login(
            json!({"key": bob, "client": "web"}),
            Some(origin.clone()),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let me = r.json();
    assert_eq!(me["user"]["name"], "bob");
    assert_eq!(me["user"]["role"], "operator");
    assert!(me["key"].get("key").is_none(), "the secret is not echoed");
    let (cookie, set) = cookie_of(&r);
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert_eq!(cookie, format!("gatekey_session={bob}"));
    // A key without expiry: the cookie lives for login_key_ttl (12 h).
    assert_eq!(max_age(&set), Some(12 * 3600), "{set}");
    let keys_after = c.get("/api/v1/apikeys", &c.admin_key).await.json()["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(keys_before, keys_after);

    let with_cookie = |method: &'static str, path: &'static str| HttpRequest {
        method,
        path,
        key: None,
        body: Some("null".into()),
        headers: vec![("cookie", cookie.clone()), ("origin", origin.clone())],
    };
    let who = c.http(with_cookie("GET", "/api/v1/whoami")).await;
    assert_eq!(who.status, 200, "{}", who.body);
    assert_eq!(who.json()["via"], "cookie");
    assert_eq!(who.json()["user"]["name"], "bob");

    let logins = audit(&c, "action=auth.login").await;
    let rec = logins
        .iter()
        .find(|r| r["user"] == "bob")
        .unwrap_or_else(|| panic!("{logins:?}"));
    assert_eq!(rec["detail"]["method"], "api_key");
    let key_id = who.json()["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(rec["detail"]["key"], format!("gka_{key_id}"));

    // Signing out clears the cookie but leaves a key that login did not make.
    let out = c.http(with_cookie("POST", "/api/v1/logout")).await;
    assert_eq!(out.status, 204, "{}", out.body);
    assert_eq!(max_age(out.header("set-cookie").unwrap()), Some(0));
    assert_eq!(c.get("/api/v1/whoami", &bob).await.status, 200);

    // An expiring key: the cookie ends with it.
    let r = c
        .send(
            "POST",
            "/api/v1/apikeys",
            &c.admin_key,
            json!({"user": "bob", "name": "short", "expires_in_seconds": 600}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let short = r.json()["key"].as_str().unwrap().to_string();
    let short_id = r.json()["id"].as_str().unwrap().to_string();
    let r = c
        .http(login(
            json!({"key": short, "client": "web"}),
            Some(origin.clone()),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let age = max_age(&cookie_of(&r).1).unwrap();
    assert!((590..=600).contains(&age), "{age}");

    // Refusals.
    // The right id with a wrong secret.
    let last = if bob.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &bob[..bob.len() - 1]);
    for (body, status, text) in [
        (
            json!({"key": wrong, "client": "web"}),
            401,
            "invalid API key",
        ),
        (
            json!({"key": "gka_not-a-key", "client": "web"}),
            401,
            "invalid API key",
        ),
        (
            json!({"key": bob, "client": "cli"}),
            400,
            "for the web console",
        ),
        (json!({"key": bob}), 400, "for the web console"),
        (
            json!({"key": bob, "user": "bob", "password": "x", "client": "web"}),
            400,
            "send user and password",
        ),
        (json!({"client": "web"}), 400, "send user and password"),
    ] {
        let r = c.http(login(body.clone(), Some(origin.clone()))).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.body.contains(text), "{body}: {}", r.body);
        assert!(r.header("set-cookie").is_none(), "{body}");
    }
    let r = c
        .http(login(
            json!({"key": bob, "client": "web"}),
            Some("https://evil.example".into()),
        ))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // A revoked key cannot sign in.
    let r = c
        .send(
            "DELETE",
            &format!("/api/v1/apikeys/{short_id}"),
            &c.admin_key,
            json!(null),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c
        .http(login(json!({"key": short, "client": "web"}), Some(origin)))
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("revoked"), "{}", r.body);

    let failed = audit(&c, "action=auth.failed").await;
    assert!(
        failed
            .iter()
            .filter(|r| r["detail"]["reason"] == "invalid API key")
            .count()
            >= 2,
        "{failed:?}"
    );
    assert!(
        failed.iter().any(|r| r["detail"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("revoked")),
        "{failed:?}"
    );
}
