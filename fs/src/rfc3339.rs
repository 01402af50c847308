//! Times as RFC 3339 text in UTC (image configs' `created`, history, containerd's labels).

use std::time::SystemTime;

/// `t` as RFC 3339 in UTC (`2026-11-29T10:00:00.123456789Z`).
pub fn format(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Now, as RFC 3339 in UTC.
pub fn now() -> String {
    format(SystemTime::now())
}
