//! The control socket: a root-only unix socket under the store root serving a
//! [`MountService`], one thread per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::protocol::{Request, Response, MAX_LINE};
use super::MountService;

/// Binds the control socket at `path` (replacing a stale one), mode 0600.
///
/// The caller must hold the daemon lock, so a socket already at `path` is a dead daemon's.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created under a 0700 root, then narrowed: no other user can reach it in between.
    let listener = super::client::with_short_path(path, |p| UnixListener::bind(p))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until the listener fails. Runs on the calling thread.
pub fn serve(service: MountService, listener: UnixListener) {
    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                continue;
            }
        };
        // Only root and the daemon's own user may talk to it (the socket is 0600 too).
        match peer_uid(&stream) {
            Some(uid) if uid == 0 || uid == me => {}
            other => {
                tracing::warn!(uid = ?other, "refused a control connection from another user");
                continue;
            }
        }
        let service = service.clone();
        // Counted from the accept, so an idle daemon never exits under a client that has
        // connected but not yet sent its request.
        let busy = service.activity();
        let _ = std::thread::Builder::new()
            .name("strata-control".into())
            .spawn(move || {
                connection(&service, stream);
                drop(busy);
            });
    }
}

fn peer_uid(stream: &UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

/// Whether the peer lives in the daemon's mount namespace (a mount made for a client in another
/// namespace would be invisible to it).
fn same_mount_namespace(stream: &UnixStream) -> bool {
    let Ok(cred) = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
    else {
        return false;
    };
    let ns = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    match (ns(cred.pid().to_string()), ns("self".into())) {
        (Some(a), Some(b)) => a == b,
        // Cannot tell (e.g. /proc hidden): do not refuse.
        _ => true,
    }
}

fn connection(service: &MountService, stream: UnixStream) {
    let same_ns = same_mount_namespace(&stream);
    let Ok(write) = stream.try_clone() else {
        return;
    };
    let mut write = write;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let response = if line.len() > MAX_LINE {
            Response::Error("request too long".into())
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Mount(_)) if !same_ns => Response::Error(
                    "the strata daemon runs in another mount namespace: its mounts would not \
                     be visible here (stop it with `strata daemon --stop`, or run the client in \
                     the daemon's namespace)"
                        .into(),
                ),
                // A daemon on its way out takes no new mounts: closing without an answer makes
                // the client start a new daemon.
                Ok(Request::Mount(_)) if service.is_closing() => return,
                Ok(req) => handle(service, req),
                Err(e) => Response::Error(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
            format!("{{\"error\":\"cannot encode the answer: {e}\"}}").into_bytes()
        });
        out.push(b'\n');
        if write.write_all(&out).is_err() {
            return;
        }
        if line.len() > MAX_LINE {
            return;
        }
    }
}

fn ok<T: serde::Serialize>(v: T) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(e.to_string()),
    }
}

fn handle(service: &MountService, req: Request) -> Response {
    let busy = service.activity();
    match req {
        Request::Ping => ok(serde_json::json!({
            "pid": std::process::id(),
            "root": service.store().root(),
        })),
        Request::Mount(r) => match service.mount(*r) {
            Ok(info) => ok(info),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::Unmount { mountpoint, lazy } => match service.unmount(&mountpoint, lazy) {
            Ok(()) => ok(serde_json::Value::Null),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::List => ok(service.list()),
        Request::Wait { mountpoint } => {
            drop(busy);
            service.wait_unmounted(&mountpoint);
            ok(serde_json::Value::Null)
        }
        Request::Stats { mountpoint } => match service.stats(&mountpoint) {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::Metrics => Response::Ok(service.metrics()),
        Request::Diff {
            mountpoint,
            exclude,
        } => match service.changes(&mountpoint, &exclude) {
            Ok(c) => ok(c),
            Err(e) => Response::Error(e.to_string()),
        },
        Request::CacheGc { max_size } => Response::Ok(service.cache_gc(max_size)),
        Request::Shutdown { forget } => {
            let s = service.clone();
            // Answer first; the daemon's main thread exits once the service has stopped.
            std::thread::spawn(move || s.shutdown(!forget));
            ok(serde_json::Value::Null)
        }
    }
}
