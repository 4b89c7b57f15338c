//! The private CA of DESIGN.md §7: `comatching-relay pki init` mints a CA, `pki issue` a server
//! or client certificate signed by it (rcgen, ECDSA P-256).
//!
//! The core ([`new_ca`], [`issue`]) is pure: names, SANs and validity in, PEM out, `now` passed
//! in. The file shell ([`init_dir`], [`issue_into_dir`]) writes keys with mode 0600 and never
//! overwrites an existing file: re-running `init` by mistake must not orphan every certificate
//! already issued.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
const ORGANISATION: &str = "COMAtching Edge";
/// The longest a CA may live (10 years) and a leaf (825 days, the CA/Browser Forum's old cap).
pub const MAX_CA_DAYS: u32 = 3650;
pub const MAX_LEAF_DAYS: u32 = 825;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA cannot be used: {0}")]
    BadCa(String),
    #[error("certificate generation failed: {0}")]
    Crypto(#[from] rcgen::Error),
}

impl PkiError {
    /// A stable code for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            PkiError::Invalid(_) => "pki_invalid",
            PkiError::Exists(_) => "pki_exists",
            PkiError::Io { .. } => "pki_io",
            PkiError::BadCa(_) => "pki_bad_ca",
            PkiError::Crypto(_) => "pki_crypto",
        }
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A TLS server (the relay's HTTPS listener, the broker's AMQPS listener).
    Server,
    /// A TLS client (a service connecting to the broker).
    Client,
}

#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Common name and file stem: `[a-z0-9][a-z0-9.-]*`, at most 64 bytes. For a client
    /// certificate this is the identity the peer sees (the broker user, say).
    pub name: String,
    pub kind: Kind,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "name {name:?}: use 1-64 characters of a-z, 0-9, '.' and '-', starting with a letter or digit"
        )))
    }
}

fn check_days(days: u32, max: u32) -> Result<(), PkiError> {
    if (1..=max).contains(&days) {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "validity of {days} days: must be 1..={max}"
        )))
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ca_params(common_name: &str, days: u32, now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(common_name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(i64::from(days));
    p
}

/// A new self-signed CA (may sign leaves only, no intermediates).
pub fn new_ca(common_name: &str, days: u32, now: OffsetDateTime) -> Result<Pem, PkiError> {
    if common_name.trim().is_empty() || common_name.len() > 64 {
        return Err(PkiError::Invalid("the CA's name must be 1-64 bytes".into()));
    }
    check_days(days, MAX_CA_DAYS)?;
    let key = KeyPair::generate()?;
    let cert = ca_params(common_name, days, now).self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A leaf certificate for `spec`, signed by `ca`. The leaf expires no later than the CA.
pub fn issue(ca: &Pem, spec: &LeafSpec, now: OffsetDateTime) -> Result<Pem, PkiError> {
    check_name(&spec.name)?;
    check_days(spec.days, MAX_LEAF_DAYS)?;
    if spec.kind == Kind::Server && spec.dns.is_empty() && spec.ips.is_empty() {
        return Err(PkiError::Invalid(
            "a server certificate needs at least one --dns name or --ip address".into(),
        ));
    }
    let bad_ca = PkiError::BadCa;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|e| bad_ca(format!("key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, &ca_key)
        .map_err(|e| bad_ca(format!("certificate: {e}")))?;
    let ca_not_after = not_after(&ca.cert).map_err(bad_ca)?;

    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&spec.name);
    p.is_ca = IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match spec.kind {
        Kind::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Kind::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    for d in &spec.dns {
        let name = d
            .clone()
            .try_into()
            .map_err(|e| PkiError::Invalid(format!("--dns {d:?}: {e}")))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in &spec.ips {
        p.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    p.not_before = now - Duration::hours(1);
    p.not_after = (now + Duration::days(i64::from(spec.days))).min(ca_not_after);
    if p.not_after <= now {
        return Err(bad_ca("it has expired".into()));
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The end of a PEM certificate's validity.
pub fn not_after(pem: &str) -> Result<OffsetDateTime, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    Ok(cert.validity().not_after.to_datetime())
}

// ---- the file shell ----

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(mode);
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

/// `pki init`: writes `ca.pem` and `ca.key` (0600) into `dir`, which may exist but must not
/// hold a CA already. Returns the certificate's path.
pub fn init_dir(dir: &Path, common_name: &str, days: u32) -> Result<PathBuf, PkiError> {
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert, &key])?;
    let ca = new_ca(common_name, days, OffsetDateTime::now_utc())?;
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_new(&key, &ca.key, 0o600)?;
    write_new(&cert, &ca.cert, 0o644)?;
    Ok(cert)
}

/// `pki issue`: signs a leaf with the CA in `dir` and writes `<name>.pem` and `<name>.key`
/// (0600) next to it. Returns both paths.
pub fn issue_into_dir(dir: &Path, spec: &LeafSpec) -> Result<(PathBuf, PathBuf), PkiError> {
    check_name(&spec.name)?;
    if spec.name == "ca" {
        return Err(PkiError::Invalid("the name \"ca\" is the CA's own".into()));
    }
    let (cert, key) = (
        dir.join(format!("{}.pem", spec.name)),
        dir.join(format!("{}.key", spec.name)),
    );
    refuse_existing(&[&cert, &key])?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
    };
    let ca = Pem {
        cert: read(CA_CERT)?,
        key: read(CA_KEY)?,
    };
    let leaf = issue(&ca, spec, OffsetDateTime::now_utc()).map_err(|e| match e {
        PkiError::BadCa(why) => PkiError::BadCa(format!("{}: {why}", dir.display())),
        other => other,
    })?;
    write_new(&key, &leaf.key, 0o600)?;
    write_new(&cert, &leaf.cert, 0o644)?;
    Ok((cert, key))
}

/// The link key's file name in a pki directory.
pub const LINK_KEY: &str = "link.key";

/// `pki link-key`: writes a fresh random link key (64 hex digits, 0600) to `dir/link.key`, for
/// `broker.link_key_file` on every service (see `comatching_protocol::mac`).
pub fn link_key_into_dir(dir: &Path) -> Result<PathBuf, PkiError> {
    let path = dir.join(LINK_KEY);
    refuse_existing(&[&path])?;
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = comatching_protocol::mac::LinkKey::from_bytes(rand::random());
    write_new(&path, &format!("{}\n", key.to_hex()), 0o600)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn server(name: &str) -> LeafSpec {
        LeafSpec {
            name: name.into(),
            kind: Kind::Server,
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 30,
        }
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let ca = new_ca("test CA", 30, now()).unwrap();
        let cases = [
            (
                LeafSpec {
                    name: "Bad Name".into(),
                    ..server("x")
                },
                "name",
            ),
            (
                LeafSpec {
                    name: "../etc".into(),
                    ..server("x")
                },
                "name",
            ),
            (
                LeafSpec {
                    days: 0,
                    ..server("x")
                },
                "validity",
            ),
            (
                LeafSpec {
                    days: MAX_LEAF_DAYS + 1,
                    ..server("x")
                },
                "validity",
            ),
            (
                LeafSpec {
                    dns: vec![],
                    ips: vec![],
                    ..server("x")
                },
                "at least one",
            ),
            (
                LeafSpec {
                    dns: vec!["bad name with spaces ✗".into()],
                    ..server("x")
                },
                "--dns",
            ),
        ];
        for (spec, why) in cases {
            let e = issue(&ca, &spec, now()).unwrap_err();
            assert_eq!(e.code(), "pki_invalid", "{spec:?}");
            assert!(e.to_string().contains(why), "{spec:?}: {e}");
        }
        assert!(new_ca("", 30, now()).is_err());
        assert!(new_ca("x", MAX_CA_DAYS + 1, now()).is_err());
        let garbage = Pem {
            cert: "not a certificate".into(),
            key: ca.key.clone(),
        };
        assert_eq!(
            issue(&garbage, &server("x"), now()).unwrap_err().code(),
            "pki_bad_ca"
        );
    }

    #[test]
    fn a_leaf_never_outlives_its_ca_and_an_expired_ca_signs_nothing() {
        let t0 = now();
        let ca = new_ca("short CA", 10, t0).unwrap();
        let leaf = issue(&ca, &server("relay"), t0).unwrap();
        let leaf_end = not_after(&leaf.cert).unwrap();
        assert!(leaf_end <= t0 + Duration::days(10) + Duration::seconds(1));
        let e = issue(&ca, &server("relay"), t0 + Duration::days(11)).unwrap_err();
        assert_eq!(e.code(), "pki_bad_ca", "{e}");
    }

    #[test]
    fn files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "files CA", 30).unwrap();
        let again = init_dir(dir.path(), "files CA", 30).unwrap_err();
        assert_eq!(again.code(), "pki_exists");
        let (_, key) = issue_into_dir(dir.path(), &server("relay")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [dir.path().join(CA_KEY), key] {
                let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", k.display());
            }
        }
        let twice = issue_into_dir(dir.path(), &server("relay")).unwrap_err();
        assert_eq!(twice.code(), "pki_exists");
        let ca_name = issue_into_dir(dir.path(), &server("ca")).unwrap_err();
        assert_eq!(ca_name.code(), "pki_invalid");
        let empty = tempfile::tempdir().unwrap();
        let no_ca = issue_into_dir(empty.path(), &server("relay")).unwrap_err();
        assert_eq!(no_ca.code(), "pki_io", "{no_ca}");
        let key = link_key_into_dir(dir.path()).unwrap();
        let text = std::fs::read_to_string(&key).unwrap();
        comatching_protocol::mac::LinkKey::from_hex(&text).expect("a valid link key");
        assert_eq!(
            link_key_into_dir(dir.path()).unwrap_err().code(),
            "pki_exists"
        );
    }
}
