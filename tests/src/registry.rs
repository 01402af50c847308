//! A real OCI registry for tests: Debian's `docker-registry` on a free loopback port, optionally
//! behind htpasswd basic auth, stopped by PID when dropped. Its access log tells how many bytes
//! each request moved.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct TestRegistry {
    pub addr: String,
    pub dir: PathBuf,
    child: Child,
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestRegistry {
    /// Starts a registry; with `user`, behind basic auth for that user and password.
    pub fn start(dir: &Path, user: Option<(&str, &str)>) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((u, p)) = user {
            let htpasswd = dir.join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .context("running htpasswd (apt install apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed");
            }
            fs::write(&htpasswd, &out.stdout)?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{auth}",
            dir.join("data").display()
        );
        fs::write(dir.join("config.yml"), config)?;
        let log = fs::File::create(dir.join("access.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let reg = TestRegistry {
            addr,
            dir: dir.to_path_buf(),
            child,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("registry at {} did not become ready", self.addr)
    }

    /// Lines of the access log so far.
    pub fn log_lines(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\" ") && l.contains("HTTP/1."))
            .map(str::to_string)
            .collect()
    }

    /// Response bytes of access-log lines after `from` whose request line contains `filter`.
    pub fn bytes_since(&self, from: usize, filter: &str) -> u64 {
        self.log_lines()
            .iter()
            .skip(from)
            .filter(|l| l.contains(filter))
            .filter_map(|l| {
                // … "GET /v2/… HTTP/1.1" 206 1234 "" "agent"
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                after.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
