//! For the Redis tests (`tests/redis_*.rs`): private `redis-server`
//! processes, each on a free port of its own (never a Redis that happens to
//! be running), killed on drop; corecast nodes pointed at them; and small
//! helpers to wait for a condition and to give a test a deadline.
//!
//! Needs `redis-server` and `redis-cli` on PATH (`apt-get install -y
//! redis-server`; `scripts/test.sh` does it).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Client, Server, start_server};

/// How long a fresh redis-server has to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments, kept for `restart`.
    args: Vec<String>,
    /// Put before every `redis-cli` command (e.g. `-a pw`).
    cli_auth: Vec<String>,
}

impl RedisServer {
    /// A plain Redis: no persistence, loopback only.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        require("redis-server");
        require("redis-cli");
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut last = String::new();
        // A free port can be taken between our check and Redis's bind: retry.
        for _ in 0..5 {
            let mut r = RedisServer { port: free_port(), child: None, args: args.clone(), cli_auth: Vec::new() };
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server would not start: {last}");
    }

    /// `redis-cli` calls will log in with these arguments (e.g. `["-a", "pw"]`).
    pub fn cli_auth(mut self, args: &[&str]) -> RedisServer {
        self.cli_auth = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// This server's RDB file name in /tmp (per test process and port).
    fn rdb_name(&self) -> String {
        format!("corecast-test-{}-{}.rdb", std::process::id(), self.port)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        // An RDB of its own: a replica's full sync writes one even with
        // `--save ""`, and a server starting later must not load it.
        let rdb = self.rdb_name();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .args(["--dbfilename", &rdb])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("spawn redis-server: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server on port {port} exited at once ({status}); port taken?"));
            }
            if answers(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server on port {port} did not answer within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("redis-server is running").id() as i32
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same arguments (and no data,
    /// as after a crash without persistence).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// SIGSTOP: the sockets stay open, nothing answers.
    pub fn pause(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Whether the process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Like `cli`, but `None` if redis-cli fails (e.g. the server is down).
    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = self.cli_command().args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `redis-cli -p PORT args...`; returns its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_command().args(args).output().expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn cli_command(&self) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string(), "--no-auth-warning"]).args(&self.cli_auth);
        cmd
    }

    /// `PUBLISH channel payload` (any bytes); returns how many subscriber
    /// connections received it.
    pub fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> u64 {
        let out = self
            .cli_command()
            .args([OsStr::new("PUBLISH"), OsStr::new(channel), OsStr::from_bytes(payload.as_ref())])
            .output()
            .expect("run redis-cli");
        let n = String::from_utf8_lossy(&out.stdout).trim().to_string();
        n.parse().unwrap_or_else(|_| panic!("PUBLISH replied {n:?}"))
    }

    /// `PUBSUB NUMSUB channel`: subscriber connections on `channel`.
    pub fn numsub(&self, channel: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        let n = out.lines().nth(1).unwrap_or("");
        n.trim().parse().unwrap_or_else(|_| panic!("PUBSUB NUMSUB replied {out:?}"))
    }

    /// `PUBSUB CHANNELS pattern`, sorted, without the census's control
    /// channels (`<prefix>user:#census...`), which every node holds for its
    /// whole life (`services::census`).
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(&["PUBSUB", "CHANNELS", pattern])
            .lines()
            .filter(|l| !l.is_empty() && !l.contains("user:#census"))
            .map(String::from)
            .collect();
        v.sort();
        v
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // Let a paused server run again so that it dies at once.
            signal(c.id() as i32, libc::SIGCONT);
        }
        self.kill();
        let _ = std::fs::remove_file(std::path::Path::new("/tmp").join(self.rdb_name()));
    }
}

// ---- corecast nodes -----------------------------------------------------------

/// A corecast node with `shards` shards on `redis_url`, ready (its Redis
/// links up: `/readyz` is 200).
pub fn node(redis_url: &str, shards: usize) -> Server {
    start_server(&["--shards", &shards.to_string(), "--redis", redis_url])
}

/// A corecast process that may never become ready (e.g. a wrong Redis
/// password): started without waiting for `/readyz`, stderr kept in a file.
pub struct UnreadyNode {
    pub addr: SocketAddr,
    pub child: super::Spawned,
    pub log: PathBuf,
}

impl UnreadyNode {
    pub fn start(args: &[&str]) -> UnreadyNode {
        let log = std::env::temp_dir().join(format!("corecast-test-{}-{}.log", std::process::id(), free_port()));
        let file = std::fs::File::create(&log).expect("create log file");
        let mut child = super::spawn_corecast(args, |c| {
            c.stderr(file);
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("read stdout");
        let addr = line
            .trim()
            .strip_prefix("corecast listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        UnreadyNode { addr, child, log }
    }

    /// `GET path` → (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        super::http_at(self.addr, "GET", path, &[], b"")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UnreadyNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

// ---- a raw RESP connection ------------------------------------------------------

/// A RESP2 value as Redis sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

impl Resp {
    /// The text of a simple string, error or bulk string (lossy).
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(n) => n.to_string(),
            other => panic!("not text: {other:?}"),
        }
    }
}

/// One connection to Redis of the test's own, speaking RESP2 directly: the
/// exact bytes of what Redis delivers (a subscriber), or commands that must
/// get through when no new connection would (`CONFIG SET maxclients 1`).
pub struct RespConn(BufReader<TcpStream>);

impl RespConn {
    pub fn open(port: u16) -> RespConn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RespConn(BufReader::new(s))
    }

    pub fn send(&mut self, args: &[&[u8]]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&out).expect("write to redis");
    }

    /// Sends one command and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&args);
        self.read()
    }

    /// Reads one value (panics on a timeout).
    pub fn read(&mut self) -> Resp {
        let mut line = String::new();
        let n = self.0.read_line(&mut line).expect("read from redis");
        assert!(n > 0, "redis closed the connection");
        let (kind, rest) = line.trim_end().split_at(1);
        match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(rest.parse().expect("an integer")),
            "$" => {
                let len: i64 = rest.parse().expect("a length");
                if len < 0 {
                    return Resp::Bulk(None);
                }
                let mut b = vec![0; len as usize + 2];
                self.0.read_exact(&mut b).expect("a bulk string");
                b.truncate(len as usize);
                Resp::Bulk(Some(b))
            }
            "*" => {
                let len: i64 = rest.parse().expect("a length");
                Resp::Array((0..len.max(0)).map(|_| self.read()).collect())
            }
            _ => panic!("not RESP2: {line:?}"),
        }
    }

    /// Reads until a Pub/Sub `message` (or `smessage`) arrives; returns its
    /// channel and payload bytes, as Redis delivered them.
    pub fn next_message(&mut self) -> (String, Vec<u8>) {
        loop {
            if let Resp::Array(v) = self.read()
                && v.len() == 3
                && matches!(v[0].text().as_str(), "message" | "smessage")
                && let Resp::Bulk(Some(payload)) = &v[2]
            {
                return (v[1].text(), payload.clone());
            }
        }
    }
}

// ---- protocol helpers -----------------------------------------------------------

/// The next event, or a panic naming what was expected.
pub fn expect_event(c: &mut Client, what: &str, timeout: Duration) -> Value {
    c.recv_json(timeout).unwrap_or_else(|| panic!("no event within {timeout:?}; expected {what}"))
}

/// Subscribes and waits for the reply: with Redis, it comes once this node is
/// subscribed at Redis.
pub fn subscribe(c: &mut Client, room: &str) {
    c.send_json(&json!({"op": "subscribe", "room": room, "id": room}));
    let v = expect_event(c, "subscribed", Duration::from_secs(5));
    assert_eq!(v, json!({"ev": "subscribed", "room": room, "id": room}));
}

pub fn unsubscribe(c: &mut Client, room: &str) {
    c.send_json(&json!({"op": "unsubscribe", "room": room, "id": room}));
    let v = expect_event(c, "unsubscribed", Duration::from_secs(5));
    assert_eq!(v, json!({"ev": "unsubscribed", "room": room, "id": room}));
}

/// A `ping` answered within `timeout`: the shard is serving.
pub fn ping(c: &mut Client, timeout: Duration) {
    c.send_json(&json!({"op": "ping", "id": "p"}));
    let v = expect_event(c, "pong", timeout);
    assert_eq!(v, json!({"ev": "pong", "id": "p"}));
}

// ---- waiting --------------------------------------------------------------------

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out after {limit:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test's deadline: if the test still runs after `limit`, the whole test
/// binary aborts with a message (a hung test must not hang CI). Dropping it
/// (the test ended) stops the watchdog.
pub struct Deadline(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

pub fn deadline(name: &'static str, limit: Duration) -> Deadline {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("test {name} passed its deadline of {limit:?}; aborting");
            std::process::abort();
        }
    });
    Deadline(tx)
}

// ---- plumbing -------------------------------------------------------------------

fn require(bin: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false);
    assert!(
        found,
        "`{bin}` is not on PATH. The Redis tests start private redis-server processes; \
         install it first: apt-get install -y redis-server (scripts/test.sh does)"
    );
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Does something on `port` answer an inline PING (even with NOAUTH)?
pub fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && (line.starts_with('+') || line.starts_with('-'))
}

/// The child gets SIGKILL when the thread that spawned it (the test's) ends,
/// so an aborted test leaves no redis-server behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: plain syscall; the pid is our own child.
    unsafe { libc::kill(pid, sig) };
}

// ---- appended for the chaos run (tests/chaos.rs) ---------------------------------

impl RedisServer {
    /// Drops `--replicaof HOST PORT` from the arguments `restart` uses, so
    /// that a server started as a replica comes back from a restart as a
    /// primary (loading its RDB), as the Sentinel-managed primary it has
    /// meanwhile become would.
    pub fn forget_replicaof(&mut self) {
        if let Some(i) = self.args.iter().position(|a| a == "--replicaof") {
            self.args.drain(i..(i + 3).min(self.args.len()));
        }
    }

    /// The RDB file `restart` loads (it exists once a `BGSAVE` or a full
    /// sync as a replica wrote it): in /tmp, or the `--dir` the extra
    /// arguments give (the Cluster rig's).
    pub fn rdb_path(&self) -> PathBuf {
        let dir = self.args.iter().rposition(|a| a == "--dir").and_then(|i| self.args.get(i + 1));
        std::path::Path::new(dir.map(String::as_str).unwrap_or("/tmp")).join(self.rdb_name())
    }
}
