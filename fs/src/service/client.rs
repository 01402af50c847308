//! Talking to the node daemon over its control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::protocol::{Request, Response, MAX_LINE};

/// Why a call did not get an answer (as opposed to an error answer, which is
/// [`CallError::Daemon`]).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no strata daemon answers at {path}: {source}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(String),
}

/// A connection to the daemon of one store root.
pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, CallError> {
        let stream = with_short_path(path, |p| UnixStream::connect(p)).map_err(|source| {
            CallError::Connect {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Client {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, CallError> {
        let mut line = serde_json::to_vec(req).map_err(|e| CallError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        let mut answer = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64 * 64)
            .read_until(b'\n', &mut answer)?;
        if n == 0 {
            return Err(CallError::Closed);
        }
        match serde_json::from_slice::<Response>(&answer) {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Error(e)) => Err(CallError::Daemon(e)),
            Err(e) => Err(CallError::Protocol(e.to_string())),
        }
    }
}

/// Longest socket path `sockaddr_un` holds (with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Calls `f` with `path`, or, when `path` is too long for a unix socket address, with the
/// same file reached through `/proc/self/fd/N/NAME` where N is an open descriptor of its
/// directory (deep store roots keep working).
pub fn with_short_path<T>(
    path: &Path,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    f(&short)
}
