//! TLS for tests: a throwaway PKI made with the `openssl` command line (a CA, a server
//! certificate for 127.0.0.1, a client certificate), a `docker-registry` serving HTTPS (and
//! optionally requiring client certificates), and fake Docker credential helpers.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::registry::free_port;
use crate::util::run;

/// PEM files of a test PKI.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA certificate.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Makes a CA (EC P-256), a server certificate for `IP:127.0.0.1` and a client certificate,
    /// both signed by the CA, under `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=strata test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")))
        .context("making the test CA (is openssl installed?)")?;
        let leaf = |name: &str, cn: &str, ext: &str, serial: &str| -> Result<()> {
            let extfile = p(&format!("{name}.ext"));
            fs::write(&extfile, ext)?;
            run(Command::new("openssl")
                .args(["req", "-new"])
                .args(ec)
                .args(["-subj", &format!("/CN={cn}")])
                .arg("-keyout")
                .arg(p(&format!("{name}.key")))
                .arg("-out")
                .arg(p(&format!("{name}.csr"))))?;
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial", serial])
                .arg("-in")
                .arg(p(&format!("{name}.csr")))
                .arg("-CA")
                .arg(p("ca.pem"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(&extfile)
                .arg("-out")
                .arg(p(&format!("{name}.pem"))))?;
            Ok(())
        };
        leaf(
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
            "2",
        )?;
        leaf(
            "client",
            "strata test client",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
            "3",
        )?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        })
    }
}

/// `docker-registry` serving HTTPS on a free loopback port with the PKI's server certificate;
/// with `require_client_cert`, only to clients with a certificate signed by the PKI's CA.
/// Stopped by PID when dropped.
pub struct TlsRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub dir: PathBuf,
    child: Child,
}

impl TlsRegistry {
    pub fn start(dir: &Path, pki: &Pki, require_client_cert: bool) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            pki.server_cert.display(),
            pki.server_key.display()
        );
        if require_client_cert {
            tls.push_str(&format!("    clientcas:\n      - {}\n", pki.ca.display()));
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n{tls}",
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
        let reg = TlsRegistry {
            addr,
            dir: dir.to_path_buf(),
            child,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    /// Waits until the port answers (Go's TLS server answers plain HTTP with a 400).
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
        bail!(
            "TLS registry at {} did not become ready: {}",
            self.addr,
            fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
        )
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
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `DIR/HOST/hosts.toml` with `body`, creating the directory; returns `DIR/HOST`.
pub fn write_hosts_toml(hosts_dir: &Path, host: &str, body: &str) -> Result<PathBuf> {
    let d = hosts_dir.join(host);
    fs::create_dir_all(&d)?;
    fs::write(d.join("hosts.toml"), body)?;
    Ok(d)
}

/// Installs `DIR/docker-credential-NAME`, a helper following Docker's protocol: `get` logs
/// the server it was asked about to `DIR/NAME.gets` and answers `{"ServerURL", "Username":
/// USER, "Secret": <contents of DIR/NAME.secret>}` (or "credentials not found" when that file
/// is missing); `store` saves its input to `DIR/NAME.stored`; `erase` removes it.
pub fn credential_helper(dir: &Path, name: &str, user: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    let d = dir.display();
    let script = format!(
        r#"#!/bin/sh
case "$1" in
get)
  server=$(cat)
  echo "$server" >> "{d}/{name}.gets"
  if [ ! -f "{d}/{name}.secret" ]; then
    echo "credentials not found in native keychain"
    exit 1
  fi
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"%s"}}\n' "$server" "$(cat "{d}/{name}.secret")"
  ;;
store) cat > "{d}/{name}.stored" ;;
erase) cat > /dev/null; rm -f "{d}/{name}.stored" ;;
*) echo "unknown action $1" >&2; exit 2 ;;
esac
"#
    );
    let path = dir.join(format!("docker-credential-{name}"));
    fs::write(&path, script)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
