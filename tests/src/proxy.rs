//! A fault-injecting HTTP proxy in front of a real registry: serves 500s, drops connections
//! mid-body, corrupts range-response bodies, or stops answering, for the requests chosen.
//! One request per connection (it answers `Connection: close`), which every client handles.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// What to do to matching requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward untouched.
    None,
    /// Answer 500 without forwarding.
    ServerError,
    /// Send the headers and half the body, then close.
    Drop,
    /// Flip a byte in the middle of the body.
    Corrupt,
    /// Accept the request and never answer.
    Hang,
    /// Answer 200 with no length and stream zeros until the client goes away (at most 60 s).
    Endless,
    /// Forward without the Range header: the registry answers 200 with the whole blob.
    IgnoreRange,
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// How many more matching requests get the fault (`None`: all).
    remaining: Option<usize>,
    /// Only requests whose request line and headers contain this are faulted.
    filter: String,
    faulted: usize,
    range_requests: usize,
    range_bytes: u64,
}

/// The running proxy; stops accepting when dropped.
pub struct FaultProxy {
    pub addr: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, up) = (state.clone(), stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, up) = (st.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &up, &st);
                });
            }
        });
        Ok(FaultProxy { addr, state, stop })
    }

    /// Applies `fault` to the next `count` requests (all if `None`) that contain `filter`.
    pub fn set(&self, fault: Fault, count: Option<usize>, filter: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.fault = Some(fault);
        s.remaining = count;
        s.filter = filter.to_string();
    }

    pub fn clear(&self) {
        self.set(Fault::None, None, "");
    }

    /// Requests that got a fault so far.
    pub fn faulted(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).faulted
    }

    /// Range requests forwarded so far and the body bytes they returned.
    pub fn range_traffic(&self) -> (usize, u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.range_requests, s.range_bytes)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    Ok(head)
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn handle(client: TcpStream, upstream: &str, state: &Mutex<State>) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let head = read_head(&mut reader)?;
    if head.is_empty() {
        return Ok(());
    }
    let mut body = vec![0u8; content_length(&head)];
    reader.read_exact(&mut body)?;
    let text = String::from_utf8_lossy(&head).to_string();
    let is_range = text.to_ascii_lowercase().contains("\nrange:");
    let fault = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let applies = s.fault.is_some_and(|f| f != Fault::None)
            && text
                .to_ascii_lowercase()
                .contains(&s.filter.to_ascii_lowercase())
            && s.remaining != Some(0);
        if applies {
            if let Some(n) = s.remaining.as_mut() {
                *n -= 1;
            }
            s.faulted += 1;
            s.fault.unwrap_or(Fault::None)
        } else {
            Fault::None
        }
    };
    let mut client = client;
    match fault {
        Fault::ServerError => {
            client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
        Fault::Hang => {
            std::thread::sleep(Duration::from_secs(120));
            return Ok(());
        }
        Fault::Endless => {
            client.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                  Docker-Content-Digest: sha256:0000000000000000000000000000000000000000000000000000000000000000\r\n\
                  Connection: close\r\n\r\n",
            )?;
            let zeros = vec![0u8; 64 << 10];
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < until {
                if client.write_all(&zeros).is_err() {
                    break;
                }
            }
            return Ok(());
        }
        _ => {}
    }
    // Forward with Connection: close so one request maps to one upstream connection.
    let mut req = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("host:") {
            continue;
        }
        if fault == Fault::IgnoreRange && lower.starts_with("range:") {
            continue;
        }
        req.extend_from_slice(line.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(format!("Host: {upstream}\r\nConnection: close\r\n\r\n").as_bytes());
    req.extend_from_slice(&body);
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&req)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    let (rhead, rbody) = resp.split_at(split);
    let mut rbody = rbody.to_vec();
    if is_range && rhead.starts_with(b"HTTP/1.1 206") {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.range_requests += 1;
        s.range_bytes += rbody.len() as u64;
    }
    // Make the response say it closes the connection.
    let rhead = String::from_utf8_lossy(rhead)
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        + "\r\nConnection: close\r\n\r\n";
    match fault {
        Fault::Drop => {
            client.write_all(rhead.as_bytes())?;
            client.write_all(&rbody[..rbody.len() / 2])?;
            client.flush()?;
            client.shutdown(Shutdown::Both)?;
        }
        Fault::Corrupt => {
            if !rbody.is_empty() {
                let mid = rbody.len() / 2;
                rbody[mid] ^= 0x55;
            }
            client.write_all(rhead.as_bytes())?;
            client.write_all(&rbody)?;
        }
        _ => {
            client.write_all(rhead.as_bytes())?;
            client.write_all(&rbody)?;
        }
    }
    Ok(())
}
