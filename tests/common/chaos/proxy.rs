//! A TCP proxy in front of one corecast node, so that the fault injector can
//! cut every client connection through it at once (a network partition as
//! the client sees it: its socket ends without a WebSocket close). One
//! listener thread, two small pump threads per proxied connection. The
//! upstream port is fixed (the node restarts on the same port).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Conns = Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>;

pub struct Proxy {
    pub port: u16,
    conns: Conns,
    stop: Arc<AtomicBool>,
    /// Connections accepted and paired with the node so far.
    pub accepted: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        l.set_nonblocking(true).expect("nonblocking listener");
        let port = l.local_addr().expect("addr").port();
        let conns: Conns = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (c, s, a) = (conns.clone(), stop.clone(), accepted.clone());
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(l, upstream, c, s, a))
            .expect("spawn the proxy");
        Proxy { port, conns, stop, accepted }
    }

    /// Ends every connection through this proxy, both ways; returns how many.
    pub fn cut(&self) -> usize {
        let all: Vec<(TcpStream, TcpStream)> = self.conns.lock().unwrap().drain().map(|(_, p)| p).collect();
        for (a, b) in &all {
            // RST rather than FIN towards the client where possible: a cut
            // cable, not a polite close.
            let _ = socket2::SockRef::from(a).set_linger(Some(Duration::ZERO));
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        all.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn accept_loop(l: TcpListener, upstream: u16, conns: Conns, stop: Arc<AtomicBool>, accepted: Arc<AtomicU64>) {
    let mut next_id = 0u64;
    let up: SocketAddr = ([127, 0, 0, 1], upstream).into();
    while !stop.load(Ordering::Relaxed) {
        let client = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        // The node down (killed, restarting): the client's connection ends
        // at once, as a refused connect would.
        let Ok(server) = TcpStream::connect_timeout(&up, Duration::from_secs(1)) else {
            drop(client);
            continue;
        };
        let _ = server.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
            (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
        else {
            continue;
        };
        conns.lock().unwrap().insert(id, (c3, s3));
        accepted.fetch_add(1, Ordering::Relaxed);
        let (m1, m2) = (conns.clone(), conns.clone());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.to_string()).stack_size(64 * 1024).spawn(f).is_ok()
        };
        if !spawn("pump-up", Box::new(move || pump(client, server, id, m1)))
            || !spawn("pump-down", Box::new(move || pump(s2, c2, id, m2)))
        {
            conns.lock().unwrap().remove(&id);
        }
    }
}

/// Copies `from` to `to` until either ends, then ends both.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, conns: Conns) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    conns.lock().unwrap().remove(&id);
}
