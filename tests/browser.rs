//! The demo page (`GET /`, `--demo`) and the JS client it imports
//! (`GET /corecast.js`): served as self-contained files, 404 when off; and a
//! real browser (headless Chromium driven by playwright-core,
//! `tests/browser/two_nodes.mjs`) chatting through it across two nodes on a
//! private Redis, cut off and reconnecting by itself. The nodes keep room
//! history (`--history-size`, PROTOCOL.md §7) and the page must show the
//! message it missed while cut off recovered. The room's namespace has
//! presence with join/leave (§11, `--config`): each page lists who is
//! here, sees the other page join across nodes, and sees it leave after the
//! grace once it is closed.
//!
//! The browser test needs `chromium` (`apt-get install -y chromium`) and
//! `tests/browser/node_modules` (`npm ci --prefix tests/browser`);
//! `scripts/test.sh` installs both. Without them it is skipped with a message,
//! unless `CORECAST_BROWSER_TEST=1`, which makes their absence a failure.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, deadline};
use common::redis_topology::TempDir;
use common::{start_server, start_server_with};

#[test]
fn demo_page_is_served_at_root_and_can_be_switched_off() {
    let s = start_server(&["--shards", "1"]);
    let mut t = std::net::TcpStream::connect(s.addr).unwrap();
    std::io::Write::write_all(&mut t, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    t.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/html; charset=utf-8"), "{head}");
    assert!(body.starts_with("<!doctype html>"), "{body:.80}");
    assert!(body.contains("<title>corecast demo</title>"));
    assert!(body.contains(r#"import { Corecast } from "/corecast.js";"#), "the page uses the JS client");
    // Self-contained: nothing fetched from elsewhere.
    for external in ["http://", "https://", "src=", "stylesheet", "@import"] {
        assert!(!body.contains(external), "the page references {external}");
    }
    assert_eq!(s.http("POST", "/", &[], b"").0, 404);
    // The JS client itself, exactly as clients/js ships it.
    let mut t = std::net::TcpStream::connect(s.addr).unwrap();
    std::io::Write::write_all(&mut t, b"GET /corecast.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    t.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/javascript; charset=utf-8"), "{head}");
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/corecast.js")).unwrap();
    assert!(body == shipped, "GET /corecast.js is clients/js/corecast.js");

    let off = start_server(&["--shards", "1", "--demo", "false"]);
    assert_eq!(off.http_get("/").0, 404);
    assert_eq!(off.http_get("/corecast.js").0, 404);
    assert_eq!(off.http_get("/healthz").0, 200);
    let env_off = start_server_with(&["--shards", "1"], |c| {
        c.env("CORECAST_DEMO", "false");
    });
    assert_eq!(env_off.http_get("/").0, 404);
}

#[test]
fn chromium_chats_across_two_nodes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var_os("CORECAST_CHROMIUM").map(PathBuf::from).unwrap_or("/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!("{} (apt-get install -y chromium)", chromium.display()));
    }
    if !dir.join("node_modules/playwright-core").is_dir() {
        missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".into());
    }
    if Command::new("node").arg("--version").stdout(Stdio::null()).status().is_err() {
        missing.push("node (apt-get install -y nodejs npm)".into());
    }
    if !missing.is_empty() {
        let msg = format!("browser test needs {}; scripts/test.sh installs them", missing.join(", "));
        assert!(std::env::var("CORECAST_BROWSER_TEST").as_deref() != Ok("1"), "{msg}");
        eprintln!("SKIPPED chromium_chats_across_two_nodes: {msg}");
        return;
    }

    let _d = deadline("chromium_chats_across_two_nodes", Duration::from_secs(60));
    let redis = RedisServer::start();
    // The nodes keep room history (PROTOCOL.md §7): the page must show the
    // message published while alice was cut off as recovered. Compression
    // is on: Chromium negotiates permessage-deflate (RFC 7692).
    // The page's rooms (`browser-…`) have presence and join/leave (§11).
    let ns_dir = TempDir::new("browser-ns");
    let config = ns_dir.file("ns.toml");
    std::fs::write(
        &config,
        "[[namespace]]\nprefix = \"browser-\"\npresence = true\njoin_leave = true\npresence_grace_ms = 1000\n",
    )
    .unwrap();
    let node = |url: &str| {
        start_server(&[
            "--shards",
            "2",
            "--redis",
            url,
            "--history-size",
            "100",
            "--compression",
            "on",
            "--config",
            &config,
        ])
    };
    let a = node(&redis.url());
    let b = node(&redis.url());
    for n in [&a, &b] {
        n.wait_until("every Redis link up", || n.links_up());
    }
    let (url_a, url_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));

    let mut child = Command::new("node")
        .arg(dir.join("two_nodes.mjs"))
        .args([&url_a, &url_b])
        .env("CORECAST_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(45);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let report = format!(
        "--- node stdout ---\n{stdout}--- node stderr ---\n{stderr}--- node A log ---\n{}--- node B log ---\n{}",
        a.logs(),
        b.logs()
    );
    let status = status.unwrap_or_else(|| panic!("two_nodes.mjs ran past {limit:?}\n{report}"));
    assert!(status.success(), "two_nodes.mjs failed ({status})\n{report}");
    assert!(stdout.lines().any(|l| l == "browser test passed"), "{report}");
    for want in [
        "101 accepted [permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "long (compressed) messages arrive intact both ways",
        "bob's page (node B) shows alice's message",
        "alice's page (node A) shows bob's message",
        "alice's page reconnected by itself",
        "alice's page gets live messages again after the reconnect",
        "alice's page (node A) saw bob join from node B",
        "both pages list alice, bob as here",
        "alice's page lists alice, bob again after the reconnect",
        "alice's page saw bob leave",
    ] {
        assert!(stdout.contains(want), "missing {want:?}\n{report}");
    }
    let outcome = "recovered the missed message";
    assert!(stdout.contains(outcome), "missing {outcome:?}\n{report}");
    // Each node inflated what its page sent and sent compressed frames.
    for n in [&a, &b] {
        assert!(n.metric("corecast_deflate_messages_in_total") >= 1.0, "no compressed message in\n{report}");
        assert!(n.metric("corecast_deflate_frames_out_total") >= 1.0, "no compressed frame out\n{report}");
    }
    eprintln!("{stdout}");
}
