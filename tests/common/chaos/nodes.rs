//! corecast nodes that restart on the same port: `--listen 127.0.0.1:PORT`
//! fixed at creation, stderr appended to a log file of the run (kept when
//! the run finds a violation), killed on drop and when the spawning thread
//! ends.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::http_at;
use crate::common::redis::{die_with_parent, free_port};

pub struct Node {
    pub index: usize,
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    pub log: PathBuf,
    pub starts: u32,
}

impl Node {
    pub fn new(index: usize, args: Vec<String>, log: PathBuf) -> Node {
        Node { index, port: free_port(), args, child: None, log, starts: 0 }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the process and waits (up to `ready_within`) for /readyz 200.
    /// Returns how long it took to be ready, or why it did not.
    pub fn start(&mut self, ready_within: Duration) -> Result<Duration, String> {
        assert!(self.child.is_none(), "node {} is already running", self.index);
        let t = Instant::now();
        let mut last = String::new();
        // The port may still be held for a moment after a kill: retry.
        for _ in 0..20 {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open the node log");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_corecast"));
            cmd.arg("--listen").arg(format!("127.0.0.1:{}", self.port)).args(&self.args);
            if let Some(d) = crate::common::test_driver() {
                cmd.arg("--driver").arg(d);
            }
            cmd.env("RUST_LOG", std::env::var("CORECAST_TEST_LOG").unwrap_or_else(|_| "info".into()))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log));
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("spawn corecast");
            let out = child.stdout.take().expect("piped stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("corecast listening on ")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => {
                    self.child = Some(child);
                    self.starts += 1;
                    break;
                }
                Err(_) => {
                    let _ = child.kill();
                    let st = child.wait();
                    last = format!("exited or silent ({st:?})");
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        if self.child.is_none() {
            return Err(format!("node {} would not start on port {}: {last}", self.index, self.port));
        }
        let addr = ([127, 0, 0, 1], self.port).into();
        while t.elapsed() < ready_within {
            if http_at(addr, "GET", "/readyz", &[], b"").0 == 200 {
                return Ok(t.elapsed());
            }
            if !self.is_running() {
                return Err(format!("node {} exited while starting", self.index));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("node {} not ready within {ready_within:?} (left running)", self.index))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (drain, PROTOCOL.md §5), then waits up to `limit` for the
    /// exit. Returns how long the drain took, or None if it overran (the
    /// process is then killed).
    pub fn drain(&mut self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        let Some(c) = self.child.as_mut() else { return Some(Duration::ZERO) };
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        while t.elapsed() < limit {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
