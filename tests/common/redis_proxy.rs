//! A TCP proxy in front of a real redis-server that can cut corecast's
//! subscriber links alone, and keep them cut: each connection's first bytes
//! (the node's `CLIENT SETNAME corecast-sub-NN`) tell a subscriber link from
//! a publisher link, so a test can hold a node's Pub/Sub down for seconds
//! while its publisher link (and the history scripts on it) keeps working.
//! A real outage of the one link `CLIENT KILL TYPE pubsub` only drops for a
//! moment (the node reconnects at once).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct RedisProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Subscriber links are cut and refused while set.
    block_subs: AtomicBool,
    stop: AtomicBool,
    /// Open subscriber links (client side), to cut when blocking starts.
    subs: Mutex<Vec<TcpStream>>,
    /// Subscriber links cut or refused so far.
    pub cut: AtomicU64,
}

impl RedisProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `redis`.
    pub fn start(redis: SocketAddr) -> RedisProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let st = st.clone();
                        thread::spawn(move || serve(client, redis, st));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RedisProxy { addr, state }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Cuts every subscriber link now and refuses new ones until `unblock`.
    pub fn block_subscribers(&self) {
        self.state.block_subs.store(true, Ordering::SeqCst);
        for s in self.state.subs.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
            self.state.cut.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn unblock_subscribers(&self) {
        self.state.block_subs.store(false, Ordering::SeqCst);
    }

    /// Subscriber links cut or refused so far.
    pub fn cut(&self) -> u64 {
        self.state.cut.load(Ordering::Relaxed)
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for s in self.state.subs.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve(mut client: TcpStream, redis: SocketAddr, st: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(redis) else { return };
    // The node's first write is its log-in (HELLO/AUTH, SELECT, SETNAME):
    // read until the name shows or a few KiB went by.
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while first.len() < 4096 && !contains(&first, b"corecast-") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => first.extend_from_slice(&buf[..n]),
        }
    }
    client.set_read_timeout(None).unwrap();
    let is_sub = contains(&first, b"corecast-sub");
    if is_sub {
        if st.block_subs.load(Ordering::SeqCst) {
            st.cut.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        st.subs.lock().unwrap().push(client.try_clone().unwrap());
    }
    if server.write_all(&first).is_err() {
        return;
    }
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(Shutdown::Both);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.join();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
