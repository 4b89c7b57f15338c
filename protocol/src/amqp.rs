//! Connecting to the broker, for both binaries (feature `amqp`): plain AMQP, or AMQPS with the
//! broker's certificate checked against our own CA only and, when configured, a client
//! certificate. The files are read once, at start, by [`tls_config`], so a missing or unreadable
//! file stops the service with its name instead of failing every reconnect.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use crate::config::{BrokerSettings, ConfigError};

/// Reads the TLS files named in `settings` (after [`BrokerSettings::check`]).
pub fn tls_config(settings: &BrokerSettings) -> Result<OwnedTLSConfig, ConfigError> {
    settings.check()?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))
    };
    let pem_text = |p: &std::path::Path| {
        let bytes = read(p)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::Invalid(format!("{}: not a PEM file", p.display())))?;
        if !text.contains("-----BEGIN ") {
            return Err(ConfigError::Invalid(format!(
                "{}: not a PEM file",
                p.display()
            )));
        }
        Ok(text)
    };
    let cert_chain = settings.tls_ca.as_deref().map(pem_text).transpose()?;
    let identity = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: pem_text(cert)?.into_bytes(),
            key: pem_text(key)?.into_bytes(),
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// One connection attempt to `url` (which carries the heartbeat) with `tls`.
pub async fn connect(url: &str, tls: &OwnedTLSConfig) -> lapin::Result<Connection> {
    Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        tls.clone(),
        lapin::runtime::default_runtime()?,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("comatching-amqp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let settings = |ca: std::path::PathBuf| BrokerSettings {
            url: "amqps://h:5671/%2f".into(),
            tls_ca: Some(ca),
            ..BrokerSettings::default()
        };
        let e = tls_config(&settings(dir.join("missing.pem"))).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = tls_config(&settings(junk.clone())).unwrap_err();
        assert!(e.to_string().contains("junk.pem: not a PEM file"), "{e}");
        // Plain AMQP needs no files at all.
        let plain = tls_config(&BrokerSettings::default()).unwrap();
        assert!(plain.cert_chain.is_none() && plain.identity.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
