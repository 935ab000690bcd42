//! A real JWKS server for the auth tests: a std `TcpListener` thread in the
//! test process that answers every GET with the key set (or status) the test
//! set last, over plain HTTP or TLS (rustls, with a certificate made by the
//! openssl CLI), and counts the requests it answered. Keys are made with the
//! openssl CLI too and turned into JWKs with jsonwebtoken.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// What the server answers: a status and a body.
struct Answer {
    status: u16,
    body: String,
}

pub struct JwksServer {
    pub addr: SocketAddr,
    tls: bool,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    /// Listens on 127.0.0.1:0; answers 500 until `set` (or `serve`) is called.
    pub fn start(tls: Option<Arc<rustls::ServerConfig>>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(Answer { status: 500, body: "not yet\n".into() }));
        let hits = Arc::new(AtomicUsize::new(0));
        let (a, h, is_tls) = (answer.clone(), hits.clone(), tls.is_some());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (a, h, tls) = (a.clone(), h.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    match tls {
                        Some(cfg) => {
                            let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
                            serve_one(&mut rustls::StreamOwned::new(conn, stream), &a, &h);
                        }
                        None => serve_one(&mut { stream }, &a, &h),
                    }
                });
            }
        });
        JwksServer { addr, tls: is_tls, answer, hits }
    }

    /// The URL to give `--jwt-jwks-url` (https names `localhost`, as the
    /// certificate does).
    pub fn url(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}/.well-known/jwks.json", self.addr.port()),
            false => format!("http://{}/.well-known/jwks.json", self.addr),
        }
    }

    pub fn set(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = Answer { status, body };
    }

    /// Serves these keys (200).
    pub fn serve(&self, keys: &[&TestKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        self.set(200, json!({ "keys": keys }).to_string());
    }

    /// Requests answered so far (whatever the answer).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads one request head, answers it, closes.
fn serve_one(s: &mut (impl Read + Write), answer: &Mutex<Answer>, hits: &AtomicUsize) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = {
        let a = answer.lock().unwrap();
        (a.status, a.body.clone())
    };
    hits.fetch_add(1, Ordering::SeqCst);
    let resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
    let _ = s.flush();
}

/// A signing key of the test and its public JWK (with `kid`).
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub jwk: Value,
}

impl TestKey {
    /// A fresh key made by `openssl genpkey` in `dir`: `rsa`, `ec` (P-256)
    /// or `ed25519`.
    pub fn new(dir: &Path, kind: &str, kid: &str) -> TestKey {
        let args: &[&str] = match kind {
            "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "ec" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "ed25519" => &["-algorithm", "ED25519"],
            _ => panic!("unknown key kind {kind}"),
        };
        let path = dir.join(format!("{kid}.key"));
        openssl(&[&["genpkey"], args, &["-out", path.to_str().unwrap()]].concat());
        let pem = std::fs::read(&path).unwrap();
        let (key, alg) = match kind {
            "rsa" => (EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS256),
            "ec" => (EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES256),
            _ => (EncodingKey::from_ed_pem(&pem).unwrap(), Algorithm::EdDSA),
        };
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        TestKey { kid: kid.to_string(), alg, key, jwk: serde_json::to_value(&jwk).unwrap() }
    }

    /// A token with these claims, signed with this key, naming its kid.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(claims, Some(&self.kid))
    }

    /// Signed with this key, naming `kid` (or none).
    pub fn sign_as(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut h = Header::new(self.alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, &self.key).unwrap()
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cc-{tag}-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A private CA (self-signed, made with `openssl req -x509`) and a server
/// certificate it signed for `localhost` / 127.0.0.1; returns the CA's PEM
/// path and the rustls config of a server with that certificate.
pub fn tls_server_config(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2", "-subj", "/CN=corecast test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat(),
    );
    openssl(
        &[&["req"][..], &ec, &["-keyout", &p("srv.key"), "-out", &p("srv.csr"), "-subj", "/CN=localhost"]].concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("srv.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("srv.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
    ]);
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("srv.pem")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("srv.key")).unwrap();
    // The one crypto provider compiled in (ring) is the default.
    let cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    (dir.join("ca.pem"), Arc::new(cfg))
}
