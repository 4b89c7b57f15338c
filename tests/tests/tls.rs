//! Transport security (DESIGN.md §7), end to end through the real binaries: `comatching-relay
//! pki init|issue` mints the certificates; `serve` with `http.tls_cert`/`http.tls_key` speaks
//! HTTPS only, clients trusting the CA get the whole API, everyone else gets nothing; relay and
//! appliance reach a broker that speaks AMQP over TLS only and demands client certificates
//! from the same CA.

use std::path::Path;
use std::process::{Command, Output};

use comatching_protocol::config::BrokerSettings;
use comatching_tests::api::{PASSWORD, http_builder, http_client};
use comatching_tests::private_broker::PrivateBroker;
use comatching_tests::relay::{pki, relay_binary};
use comatching_tests::world::{World, WorldOptions};
use comatching_tests::{Api, RelayConfig, RelayProcess, Vhost};
use serde_json::json;

fn ok(out: Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit code 2 with the stable code on stderr.
fn refused(out: Output, code: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(code), "expected {code}: {err}");
}

/// A CA and a server certificate for 127.0.0.1 and localhost in `dir`.
fn mint(dir: &Path) {
    let d = dir.to_str().expect("utf-8 path");
    ok(pki(&["init", "--dir", d, "--name", "test CA"]));
    ok(pki(&[
        "issue",
        "--dir",
        d,
        "--name",
        "relay",
        "--kind",
        "server",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_https_with_a_certificate_from_its_own_ca() {
    let pki_dir = tempfile::tempdir().expect("pki dir");
    mint(pki_dir.path());
    let vhost = Vhost::create("tls");
    let mut config = RelayConfig::new(vhost.amqp_url());
    config.http.tls_cert = Some(pki_dir.path().join("relay.pem"));
    config.http.tls_key = Some(pki_dir.path().join("relay.key"));
    config.http.trust_ca = Some(pki_dir.path().join("ca.pem"));
    let mut relay = RelayProcess::start(config).await;
    relay.wait_ready().await;
    let base = relay.base_url().to_owned();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");

    // The whole flow works over HTTPS for a client that trusts the CA ...
    let api = Api::trusting(&base, &pki_dir.path().join("ca.pem"));
    let created = api.create_account("tls_user", PASSWORD).await.expect(201);
    let token = created["token"].as_str().expect("token").to_owned();
    let me = api.get("/api/v1/me", Some(&token)).await.expect(200);
    assert_eq!(me["username"], "tls_user");
    // ... and browsers are told to stay on HTTPS.
    let r = http_client(Some(&pki_dir.path().join("ca.pem")))
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    let hsts = r
        .headers()
        .get("strict-transport-security")
        .expect("HSTS header");
    assert!(hsts.to_str().unwrap_or("").contains("max-age="), "{hsts:?}");

    // A client that does not trust the CA cannot talk to it at all.
    let other = tempfile::tempdir().expect("other pki");
    ok(pki(&[
        "init",
        "--dir",
        other.path().to_str().expect("utf-8"),
    ]));
    let e = http_client(Some(&other.path().join("ca.pem")))
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect_err("an unknown CA must fail the handshake");
    assert!(e.is_connect(), "{e:?}");
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = base.replacen("https://", "http://", 1);
    let r = http_builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("client")
        .get(format!("{plain}/healthz"))
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP must not be served: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_and_tls_configuration_errors_are_clear_and_change_nothing() {
    let dir = tempfile::tempdir().expect("pki dir");
    mint(dir.path());
    let d = dir.path().to_str().expect("utf-8");
    let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("ca");

    // Re-running init or re-issuing a name never overwrites anything.
    refused(pki(&["init", "--dir", d]), "pki_exists");
    refused(
        pki(&[
            "issue", "--dir", d, "--name", "relay", "--kind", "server", "--dns", "x",
        ]),
        "pki_exists",
    );
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).expect("ca"),
        ca_before
    );
    // Bad names, a server without SANs, an absurd validity, no CA.
    refused(
        pki(&["issue", "--dir", d, "--name", "../evil", "--kind", "client"]),
        "pki_invalid",
    );
    refused(
        pki(&["issue", "--dir", d, "--name", "web", "--kind", "server"]),
        "pki_invalid",
    );
    refused(
        pki(&[
            "issue", "--dir", d, "--name", "web", "--kind", "client", "--days", "100000",
        ]),
        "pki_invalid",
    );
    let empty = tempfile::tempdir().expect("empty");
    refused(
        pki(&[
            "issue",
            "--dir",
            empty.path().to_str().expect("utf-8"),
            "--name",
            "web",
            "--kind",
            "client",
        ]),
        "pki_io",
    );
    // A client certificate is issued (for the broker), with a private key.
    ok(pki(&[
        "issue",
        "--dir",
        d,
        "--name",
        "appliance-1",
        "--kind",
        "client",
    ]));
    assert!(dir.path().join("appliance-1.key").exists());

    // The relay refuses to start with half a TLS configuration or an unreadable certificate,
    // naming the problem.
    let run = |extra: &[(&str, String)]| {
        let mut c = Command::new(relay_binary());
        c.arg("serve").env_clear();
        c.env(
            "COMATCHING_RELAY__STORAGE__DATA_DIR",
            dir.path().join("data"),
        );
        c.env("COMATCHING_RELAY__HTTP__LISTEN", "127.0.0.1:0");
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().expect("run serve")
    };
    let half = run(&[("COMATCHING_RELAY__HTTP__TLS_CERT", format!("{d}/relay.pem"))]);
    assert_eq!(half.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&half.stderr).contains("set both or neither"),
        "{}",
        String::from_utf8_lossy(&half.stderr)
    );
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").expect("write");
    let garbage = run(&[
        (
            "COMATCHING_RELAY__HTTP__TLS_CERT",
            format!("{d}/garbage.pem"),
        ),
        ("COMATCHING_RELAY__HTTP__TLS_KEY", format!("{d}/relay.key")),
    ]);
    assert!(!garbage.status.success());
    let err = String::from_utf8_lossy(&garbage.stderr);
    assert!(err.contains("garbage.pem"), "{err}");
    let mismatched = run(&[
        ("COMATCHING_RELAY__HTTP__TLS_CERT", format!("{d}/relay.pem")),
        (
            "COMATCHING_RELAY__HTTP__TLS_KEY",
            format!("{d}/appliance-1.key"),
        ),
    ]);
    assert!(!mismatched.status.success());
    let err = String::from_utf8_lossy(&mismatched.stderr);
    assert!(err.contains("do not fit"), "{err}");
}

/// Issues one more certificate into `dir`.
fn issue(dir: &Path, name: &str, kind: &str, extra: &[&str]) {
    let d = dir.to_str().expect("utf-8 path");
    let mut args = vec!["issue", "--dir", d, "--name", name, "--kind", kind];
    args.extend_from_slice(extra);
    ok(pki(&args));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_appliance_use_amqp_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("pki dir");
    let d = dir.path();
    ok(pki(&["init", "--dir", d.to_str().expect("utf-8")]));
    issue(
        d,
        "broker",
        "server",
        &["--ip", "127.0.0.1", "--dns", "localhost"],
    );
    issue(d, "relay", "client", &[]);
    issue(d, "box-1", "client", &[]);
    let broker = PrivateBroker::start_tls("tls", d);
    let mut opts = WorldOptions::new("amqps");
    opts.amqp_url = Some(broker.amqps_url());
    opts.broker_tls = Some(d.to_path_buf());
    let mut w = World::start(&opts).await;

    // Sync (relay → appliance), hellos (appliance → relay) and match RPCs all cross TLS.
    let users = w.register(20, 8, 3).await;
    w.grant_all(&users, 10_000, 8).await;
    let pool = w.wait_converged(std::time::Duration::from_secs(60)).await;
    assert_eq!(pool.count, 20);
    let r = users[0].post_match_json("tls-match-1", &json!({})).await;
    assert!(matches!(r.status, 201 | 404), "a match over AMQPS: {r:?}");

    // The broker admits nobody else: no client certificate, a certificate of another CA, or
    // plain AMQP on its TLS port.
    let attempt = |ca: &Path, cert: Option<(&Path, &str)>, url: String| {
        let settings = BrokerSettings {
            url: comatching_protocol::config::BrokerUrls::new([url.clone()]),
            tls_ca: url.starts_with("amqps").then(|| ca.join("ca.pem")),
            tls_cert: cert.map(|(dir, n)| dir.join(format!("{n}.pem"))),
            tls_key: cert.map(|(dir, n)| dir.join(format!("{n}.key"))),
            ..BrokerSettings::default()
        };
        async move {
            let tls = comatching_protocol::amqp::tls_config(&settings).expect("tls files");
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                comatching_protocol::amqp::connect(&url, &tls),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
        }
    };
    assert!(
        attempt(d, Some((d, "relay")), broker.amqps_url()).await,
        "the control case connects"
    );
    assert!(
        !attempt(d, None, broker.amqps_url()).await,
        "no client certificate"
    );
    let other = tempfile::tempdir().expect("other pki");
    ok(pki(&[
        "init",
        "--dir",
        other.path().to_str().expect("utf-8"),
    ]));
    issue(other.path(), "relay", "client", &[]);
    assert!(
        !attempt(d, Some((other.path(), "relay")), broker.amqps_url()).await,
        "a client certificate from another CA"
    );
    assert!(
        !attempt(other.path(), Some((d, "relay")), broker.amqps_url()).await,
        "a broker certificate the client's CA did not issue"
    );
    assert!(
        !attempt(d, None, broker.amqp_url()).await,
        "plain AMQP on the TLS port"
    );
}
