//! TLS settings of registry endpoints: the system trust store, plus per host (`hosts.toml`)
//! extra CAs, a client certificate for mutual TLS, or no verification at all.

use std::path::Path;
use std::sync::Arc;

use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use super::hosts::TlsSettings;

/// Where distributions keep the system's CA bundle (after `$SSL_CERT_FILE`).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The system's trusted CA certificates (`None`: no bundle found; the bundled Mozilla roots of
/// webpki-roots are used instead).
pub(crate) fn system_roots() -> Option<Arc<Vec<Certificate<'static>>>> {
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from));
    for path in candidates {
        let Ok(pem) = std::fs::read(&path) else {
            continue;
        };
        let certs: Vec<Certificate<'static>> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            tracing::debug!(path = %path.display(), count = certs.len(), "system CA bundle");
            return Some(Arc::new(certs));
        }
    }
    tracing::debug!("no system CA bundle found; using the bundled webpki roots");
    None
}

/// The TLS configuration of the default agent: the system trust store.
pub(crate) fn default_config(system: Option<&Arc<Vec<Certificate<'static>>>>) -> TlsConfig {
    let roots = match system {
        Some(s) => RootCerts::Specific(s.clone()),
        None => RootCerts::WebPki,
    };
    TlsConfig::builder().root_certs(roots).build()
}

/// The TLS configuration for `settings`; an error names the file that could not be used.
pub(crate) fn config(
    settings: &TlsSettings,
    system: Option<&Arc<Vec<Certificate<'static>>>>,
) -> Result<TlsConfig, String> {
    let mut builder = TlsConfig::builder();
    if settings.skip_verify {
        builder = builder.disable_verification(true);
    }
    if settings.ca.is_empty() {
        builder = builder.root_certs(match system {
            Some(s) => RootCerts::Specific(s.clone()),
            None => RootCerts::WebPki,
        });
    } else {
        let mut roots: Vec<Certificate<'static>> =
            system.map(|s| s.as_ref().clone()).unwrap_or_default();
        if system.is_none() {
            tracing::warn!(
                "no system CA bundle found: only the hosts.toml `ca` certificates are trusted"
            );
        }
        for path in &settings.ca {
            let certs = read_certs(path)?;
            if certs.is_empty() {
                return Err(format!("ca {}: no PEM certificate in it", path.display()));
            }
            roots.extend(certs);
        }
        builder = builder.root_certs(RootCerts::Specific(Arc::new(roots)));
    }
    if let Some((cert, key)) = settings.client.first() {
        if settings.client.len() > 1 {
            tracing::warn!(
                "hosts.toml lists {} client certificates; only the first ({}) is used",
                settings.client.len(),
                cert.display()
            );
        }
        let chain = read_certs(cert)?;
        if chain.is_empty() {
            return Err(format!(
                "client {}: no PEM certificate in it",
                cert.display()
            ));
        }
        let key_path = key.as_deref().unwrap_or(cert);
        let key = read_key(key_path)?;
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(builder.build())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<Certificate<'static>>, String> {
    let pem = read(path)?;
    let mut out = Vec::new();
    for item in parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(out)
}

fn read_key(path: &Path) -> Result<PrivateKey<'static>, String> {
    let pem = read(path)?;
    for item in parse_pem(&pem) {
        match item {
            Ok(PemItem::PrivateKey(k)) => return Ok(k),
            Ok(_) => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Err(format!("{}: no PEM private key in it", path.display()))
}

/// A TLS failure worth its own explanation.
pub(crate) enum Failure {
    /// The server's certificate did not verify.
    Untrusted,
    /// The server refused the handshake over the client certificate (missing or unknown).
    ClientCert,
}

/// Recognises certificate failures among transport errors (rustls reports them through I/O
/// errors, so by their text).
pub(crate) fn classify(e: &ureq::Error) -> Option<Failure> {
    let text = e.to_string();
    if text.contains("invalid peer certificate") {
        return Some(Failure::Untrusted);
    }
    const CLIENT_ALERTS: &[&str] = &[
        "received fatal alert: CertificateRequired",
        "received fatal alert: BadCertificate",
        "received fatal alert: UnknownCA",
        "received fatal alert: CertificateUnknown",
        "received fatal alert: UnsupportedCertificate",
    ];
    if CLIENT_ALERTS.iter().any(|a| text.contains(a)) {
        return Some(Failure::ClientCert);
    }
    None
}
