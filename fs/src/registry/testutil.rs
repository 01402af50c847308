//! A test HTTP server on a loopback port and a client for it, shared by the unit tests of the
//! registry client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::auth::CredentialStore;
use super::{Registry, RegistryConfig};

/// A request as the test server saw it (header names in lower case).
#[derive(Clone, Debug)]
pub(super) struct Req {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) headers: HashMap<String, String>,
    pub(super) body: String,
}

pub(super) struct Resp {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

pub(super) fn resp(status: u16, headers: Vec<(&'static str, String)>, body: &[u8]) -> Resp {
    Resp {
        status,
        headers,
        body: body.to_vec(),
    }
}

pub(super) type Log = Arc<Mutex<Vec<Req>>>;

/// A tiny HTTP/1.1 server on a loopback port: one request per connection, answered by
/// `handler`; every request is logged.
pub(super) fn serve(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log: Log = Arc::default();
    let handler = Arc::new(handler);
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let handler = handler.clone();
            let log = l.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = HashMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let n: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; n];
                let _ = reader.read_exact(&mut body);
                let req = Req {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                };
                log.lock().push(req.clone());
                let r = handler(&req);
                let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", r.status);
                for (k, v) in &r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                if !r.headers.iter().any(|(k, _)| *k == "Content-Length") {
                    out.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
                }
                out.push_str("\r\n");
                let _ = stream.write_all(out.as_bytes());
                if req.method != "HEAD" {
                    let _ = stream.write_all(&r.body);
                }
            });
        }
    });
    (addr, log)
}

pub(super) fn client(creds: CredentialStore) -> Registry {
    Registry::new(
        RegistryConfig {
            attempts: 1,
            backoff: Duration::from_millis(1),
            ..RegistryConfig::default()
        },
        creds,
    )
}

pub(super) fn count(log: &Log, f: impl Fn(&Req) -> bool) -> usize {
    log.lock().iter().filter(|r| f(r)).count()
}
