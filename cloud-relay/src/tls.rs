//! HTTPS for the public API (DESIGN.md §7): the relay terminates TLS itself with tokio-rustls
//! (the `ring` provider, TLS 1.2 and 1.3, ALPN h2 and http/1.1) and serves each connection with
//! hyper's auto (HTTP/1 or HTTP/2) builder in the accept loop of `listener.rs` (axum has no TLS
//! of its own); this module builds the rustls configuration.
//!
//! Certificates are PEM files (from `comatching-relay pki issue --kind server`, or a public CA's
//! chain); they are read once at start and any problem stops the relay with the file's name.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {why}", path.display())]
    File {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain (leaf first) and its private key.
pub fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let file = |path: &Path, why: String| TlsError::File {
        path: path.to_owned(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file(key, e.to_string()))?;
    Ok((chain, key_der))
}

/// The server side: our certificate, no client certificates (browsers), h2 then http/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (chain, key_der) = load_pair(cert, key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Kind, LeafSpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;

    fn leaf(dir: &Path, name: &str, kind: Kind) -> (std::path::PathBuf, std::path::PathBuf) {
        pki::issue_into_dir(
            dir,
            &LeafSpec {
                name: name.into(),
                kind,
                dns: vec!["relay.test".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                days: 30,
            },
        )
        .unwrap()
    }

    fn client_trusting(ca_pem: &Path) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// A full handshake and one byte each way over an in-memory pipe.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: tokio_rustls::TlsConnector,
        name: &str,
    ) -> Result<(), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let srv = tokio::spawn(async move {
            let mut s = TlsAcceptor::from(server).accept(a).await.ok()?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.ok()?;
            s.write_all(&byte).await.ok()?;
            s.flush().await.ok()
        });
        let mut c = client.connect(name, b).await.map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 1];
        c.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        let _ = srv.await;
        (back == *b"x").then_some(()).ok_or("echo".into())
    }

    #[tokio::test]
    async fn an_issued_server_certificate_is_trusted_through_the_ca_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::init_dir(dir.path(), "handshake CA", 30).unwrap();
        let (cert, key) = leaf(dir.path(), "relay", Kind::Server);
        let server = server_config(&cert, &key).unwrap();
        handshake(server.clone(), client_trusting(&ca), "relay.test")
            .await
            .unwrap();
        handshake(server.clone(), client_trusting(&ca), "127.0.0.1")
            .await
            .unwrap();
        let e = handshake(server.clone(), client_trusting(&ca), "other.test")
            .await
            .unwrap_err();
        assert!(e.contains("not valid for name"), "{e}");
        // Another CA's clients do not trust it.
        let other = tempfile::tempdir().unwrap();
        let other_ca = pki::init_dir(other.path(), "other CA", 30).unwrap();
        let e = handshake(server, client_trusting(&other_ca), "relay.test")
            .await
            .unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn mismatched_or_unreadable_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_dir(dir.path(), "files CA", 30).unwrap();
        let (cert, key) = leaf(dir.path(), "relay", Kind::Server);
        let (_, other_key) = leaf(dir.path(), "other", Kind::Server);
        let e = server_config(&cert, &other_key).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &key).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        let e = server_config(&garbage, &key).unwrap_err();
        assert!(e.to_string().contains("garbage.pem"), "{e}");
    }
}
