//! A client for the relay's public HTTP contract (issue 2 §3), as the web app uses it.
//!
//! [`Api`] speaks raw HTTP and returns every answer as a [`Resp`] (status plus parsed JSON), so
//! tests can assert on error codes as easily as on successes. [`User`] and [`Operator`] wrap
//! the common flows; their `*_ok` helpers panic with the relay's answer when the status is not
//! the expected one.

use std::path::Path;
use std::time::Duration;

use comatching_protocol::UserId;
use reqwest::Method;
use serde_json::{Value, json};

use crate::profiles::{MatchOptionsBuilder, ProfileBuilder};
use crate::relay::RelayProcess;

/// A password that passes validation (10..=128 chars).
pub const PASSWORD: &str = "correct horse battery";

/// One HTTP answer: status, parsed JSON body (`Value::Null` if none or not JSON) and the raw
/// text for failure messages.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    /// Panics unless the status is `status`; returns the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "expected HTTP {status}, got {} with body {}",
            self.status, self.text
        );
        self.body
    }

    /// A response header as text (None if absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    pub fn error_field(&self) -> Option<&str> {
        self.body["error"]["field"].as_str()
    }

    /// Asserts `{"error": {"code": code, "message": <non-empty>}}` with `status`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.error_code()),
            (status, Some(code)),
            "expected HTTP {status} {code}, got {} with body {}",
            self.status,
            self.text
        );
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.text
        );
    }

    /// Asserts a 400 `validation_failed` naming `field`.
    #[track_caller]
    pub fn assert_invalid(&self, field: &str) {
        self.assert_error(400, "validation_failed");
        assert_eq!(
            self.error_field(),
            Some(field),
            "validation_failed should name field {field:?}: {}",
            self.text
        );
    }
}

/// The relay's HTTP API at one base URL.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

/// Every reqwest client of the tests starts here: reqwest is built without a crypto provider of
/// its own (one provider in the tree, `ring`; see NOTES), so the process installs `ring` once.
pub fn http_builder() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err = a provider is already installed, which is all we need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// An HTTP client; with `trust_ca`, an HTTPS client that trusts that CA (PEM) and no other.
pub fn http_client(trust_ca: Option<&Path>) -> reqwest::Client {
    let b = http_builder().timeout(Duration::from_secs(60));
    let b = match trust_ca {
        None => b,
        Some(ca) => b.tls_backend_preconfigured(tls_trusting(ca)),
    };
    b.build().expect("http client")
}

/// A rustls client configuration (the `ring` provider) whose only root is the CA in `ca`.
pub fn tls_trusting(ca: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA accepted");
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

impl Api {
    pub fn new(base_url: &str) -> Api {
        Api::with_client(base_url, http_client(None))
    }

    /// For a relay serving HTTPS with a certificate from the CA in `ca`.
    pub fn trusting(base_url: &str, ca: &Path) -> Api {
        Api::with_client(base_url, http_client(Some(ca)))
    }

    pub fn with_client(base_url: &str, http: reqwest::Client) -> Api {
        Api {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Any request: optional bearer token, optional JSON body, extra headers.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        Self::finish(req).await
    }

    /// A request with a raw body and content type (for malformed and oversized bodies).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::finish(req).await
    }

    async fn finish(req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("HTTP request to the relay");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            body,
            text,
            headers,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(Method::GET, path, token, None, &[]).await
    }

    pub async fn create_account(&self, username: &str, password: &str) -> Resp {
        let body = json!({"username": username, "password": password});
        self.request(Method::POST, "/api/v1/accounts", None, Some(&body), &[])
            .await
    }

    pub async fn login(&self, username: &str, password: &str) -> Resp {
        let body = json!({"username": username, "password": password});
        self.request(Method::POST, "/api/v1/sessions", None, Some(&body), &[])
            .await
    }

    /// Creates an account (201 expected) and returns it, logged in.
    pub async fn signup(&self, username: &str) -> User {
        let body = self.create_account(username, PASSWORD).await.expect(201);
        User {
            api: self.clone(),
            username: username.to_owned(),
            password: PASSWORD.to_owned(),
            user_id: body["user_id"]
                .as_str()
                .expect("user_id in account response")
                .to_owned(),
            token: body["token"]
                .as_str()
                .expect("token in account response")
                .to_owned(),
        }
    }

    /// Creates an account and stores `profile` for it.
    pub async fn signup_with_profile(&self, username: &str, profile: &ProfileBuilder) -> User {
        let user = self.signup(username).await;
        user.set_profile(profile).await;
        user
    }
}

/// A logged-in account.
#[derive(Clone)]
pub struct User {
    pub api: Api,
    pub username: String,
    pub password: String,
    /// 32 lowercase hex characters, as the API returns it.
    pub user_id: String,
    pub token: String,
}

impl User {
    pub fn id(&self) -> UserId {
        self.user_id.parse().expect("user_id is a UUIDv7 in hex")
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.api.get(path, Some(&self.token)).await
    }

    pub async fn me(&self) -> Resp {
        self.get("/api/v1/me").await
    }

    /// `GET /api/v1/me`, 200 expected.
    pub async fn me_ok(&self) -> Value {
        self.me().await.expect(200)
    }

    /// The current balance from `GET /api/v1/me`.
    pub async fn points(&self) -> i64 {
        self.me_ok().await["points"]
            .as_i64()
            .expect("points is an integer")
    }

    pub async fn put_profile(&self, profile: &ProfileBuilder) -> Resp {
        self.put_profile_json(profile.json()).await
    }

    /// `PUT /api/v1/me/profile` with any JSON body (synthetic profiles, malformed ones).
    pub async fn put_profile_json(&self, body: &Value) -> Resp {
        self.api
            .request(
                Method::PUT,
                "/api/v1/me/profile",
                Some(&self.token),
                Some(body),
                &[],
            )
            .await
    }

    /// `PUT /api/v1/me/profile`, 200 expected; returns the stored profile.
    pub async fn set_profile(&self, profile: &ProfileBuilder) -> Value {
        self.put_profile(profile).await.expect(200)
    }

    pub async fn delete_me(&self) -> Resp {
        self.api
            .request(Method::DELETE, "/api/v1/me", Some(&self.token), None, &[])
            .await
    }

    pub async fn logout(&self) -> Resp {
        self.api
            .request(
                Method::DELETE,
                "/api/v1/sessions/current",
                Some(&self.token),
                None,
                &[],
            )
            .await
    }

    /// `POST /api/v1/matches` with `Idempotency-Key: key`.
    pub async fn post_match(&self, key: &str, options: &MatchOptionsBuilder) -> Resp {
        self.post_match_json(key, options.json()).await
    }

    pub async fn post_match_json(&self, key: &str, body: &Value) -> Resp {
        self.api
            .request(
                Method::POST,
                "/api/v1/matches",
                Some(&self.token),
                Some(body),
                &[("Idempotency-Key", key)],
            )
            .await
    }

    /// `POST /api/v1/me/charges {amount, depositor}`.
    pub async fn request_charge(&self, amount: i64, depositor: &str) -> Resp {
        let body = json!({"amount": amount, "depositor": depositor});
        self.api
            .request(
                Method::POST,
                "/api/v1/me/charges",
                Some(&self.token),
                Some(&body),
                &[],
            )
            .await
    }

    /// Files a charge request (201 expected); returns its `charge_id`.
    pub async fn request_charge_ok(&self, amount: i64) -> String {
        let body = self.request_charge(amount, "홍길동").await.expect(201);
        body["charge_id"].as_str().expect("charge_id").to_owned()
    }

    /// `DELETE /api/v1/me/charges/{id}`.
    pub async fn cancel_charge(&self, charge_id: &str) -> Resp {
        self.api
            .request(
                Method::DELETE,
                &format!("/api/v1/me/charges/{charge_id}"),
                Some(&self.token),
                None,
                &[],
            )
            .await
    }

    /// `GET /api/v1/matches`, 200 expected; the list, newest first.
    pub async fn matches(&self) -> Vec<Value> {
        let body = self.get("/api/v1/matches").await.expect(200);
        body["matches"]
            .as_array()
            .expect("matches is an array")
            .clone()
    }
}

/// An account with the operator role: grants points and reads stats.
pub struct Operator {
    pub user: User,
}

impl Operator {
    /// Creates the account over the API, grants it the operator role with
    /// `comatching-relay admin grant-operator`, and logs in again.
    pub async fn create(api: &Api, relay: &RelayProcess, username: &str) -> Operator {
        let user = api.signup(username).await;
        relay.grant_operator(username);
        let body = api.login(username, PASSWORD).await.expect(200);
        let token = body["token"].as_str().expect("token").to_owned();
        Operator {
            user: User { token, ..user },
        }
    }

    pub async fn grant_resp(&self, user_id: &str, amount: i64, reason: &str) -> Resp {
        let body = json!({"user_id": user_id, "amount": amount, "reason": reason});
        self.user
            .api
            .request(
                Method::POST,
                "/api/v1/admin/points",
                Some(&self.user.token),
                Some(&body),
                &[],
            )
            .await
    }

    /// Grants `amount` points to `user` (201 expected); returns the new balance.
    pub async fn grant(&self, user: &User, amount: i64) -> i64 {
        let body = self
            .grant_resp(&user.user_id, amount, "booth purchase")
            .await
            .expect(201);
        body["points"].as_i64().expect("points in grant response")
    }

    /// `POST /api/v1/admin/charges/{id}/approve`.
    pub async fn approve(&self, charge_id: &str) -> Resp {
        self.user
            .api
            .request(
                Method::POST,
                &format!("/api/v1/admin/charges/{charge_id}/approve"),
                Some(&self.user.token),
                None,
                &[],
            )
            .await
    }

    /// `POST /api/v1/admin/charges/{id}/reject {reason}`.
    pub async fn reject(&self, charge_id: &str, reason: &str) -> Resp {
        self.user
            .api
            .request(
                Method::POST,
                &format!("/api/v1/admin/charges/{charge_id}/reject"),
                Some(&self.user.token),
                Some(&json!({ "reason": reason })),
                &[],
            )
            .await
    }

    /// `GET /api/v1/admin/stats`, 200 expected.
    pub async fn stats(&self) -> Value {
        self.user.get("/api/v1/admin/stats").await.expect(200)
    }

    /// `open_holds` from the stats.
    pub async fn open_holds(&self) -> i64 {
        self.stats().await["open_holds"]
            .as_i64()
            .expect("open_holds is an integer")
    }
}
