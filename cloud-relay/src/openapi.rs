//! The API's OpenAPI 3.1 document, generated from the code (utoipa): every handler carries a
//! `#[utoipa::path]` and is registered with `utoipa_axum`'s `routes!`, which adds the route to
//! the router and the operation to the document in one step, so a route cannot be served without
//! being documented (and `clippy.toml` forbids the plain `route` that could).
//!
//! Served at `GET /api/v1/openapi.json`, printed by `comatching-relay openapi`; the committed
//! copy is `docs/openapi.json` (the contract tests fail when it differs from the served one).
//!
//! Errors: each route lists its error codes with [`error_set!`], which turns them into one
//! response per status whose schema admits exactly those `code` values.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Response};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorCode;

/// The security scheme's name in the document.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "COMAtching Edge relay API",
        description = "The web app's API. Authenticated routes take `Authorization: Bearer TOKEN` \
            (the token from `POST /api/v1/accounts` or `POST /api/v1/sessions`); no cookies are \
            read. Every error is `{\"error\": {\"code\", \"message\", \"field\"?}}` with a stable \
            `code`. Cross-origin calls are allowed from `http.cors_allowed_origins` only.",
        license(name = "MIT", identifier = "MIT"),
    ),
    modifiers(&Security),
    // Referenced by hand-written schemas (a match's partner is one or the other).
    components(schemas(crate::profiles::PartnerView, crate::erasure::WithdrawnPartner)),
    tags(
        (name = "accounts", description = "Accounts, sessions and passwords"),
        (name = "profile", description = "The caller's own data"),
        (name = "matches", description = "Match requests and history"),
        (name = "charges", description = "Students' charge requests, points history and live events"),
        (name = "admin", description = "Operators only"),
        (name = "service", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An opaque session token (64 hex characters) from account creation or login.",
                    ))
                    .build(),
            ),
        );
    }
}

/// One response per status for `codes`: the description names each code and its meaning, the
/// schema is the error shape with `code` limited to the codes of that status.
pub fn error_responses(codes: &[ErrorCode]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for c in codes {
        by_status.entry(c.status().as_u16()).or_default().push(*c);
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let description = codes
                .iter()
                .map(|c| format!("`{}`: {}", c.as_str(), c.meaning()))
                .collect::<Vec<_>>()
                .join("; ");
            let string = || ObjectBuilder::new().schema_type(Type::String);
            let detail = ObjectBuilder::new()
                .property(
                    "code",
                    string().enum_values(Some(codes.iter().map(|c| c.as_str()))),
                )
                .required("code")
                .property(
                    "message",
                    string().description(Some("For people; may change.")),
                )
                .required("message")
                .property(
                    "field",
                    string().description(Some("The offending field, when there is one.")),
                )
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            let schema = ObjectBuilder::new()
                .property("error", detail)
                .required("error")
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            let response = ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(schema)).build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

/// `error_set!(Name: Code, Code, ...)` declares a type usable in `#[utoipa::path(responses(...))]`
/// that documents those error codes.
macro_rules! error_set {
    ($name:ident: $($code:ident),+ $(,)?) => {
        pub struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                $crate::openapi::error_responses(&[$($crate::error::ErrorCode::$code),+])
            }
        }
    };
}
pub(crate) use error_set;

/// The document, built once from the routes (no state needed).
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> =
        LazyLock::new(|| crate::http::api_router().into_openapi());
    &DOC
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn document_json() -> &'static str {
    static JSON: LazyLock<String> = LazyLock::new(|| {
        let mut s = document()
            .to_pretty_json()
            .expect("the OpenAPI document serialises");
        s.push('\n');
        s
    });
    &JSON
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_group_codes_by_status() {
        let r = error_responses(&[
            ErrorCode::Forbidden,
            ErrorCode::WrongPassword,
            ErrorCode::RateLimited,
        ]);
        assert_eq!(r.keys().collect::<Vec<_>>(), ["403", "429"]);
        let v = serde_json::to_value(&r["403"]).unwrap();
        let codes = &v["content"]["application/json"]["schema"]["properties"]["error"]["properties"]
            ["code"]["enum"];
        assert_eq!(codes, &serde_json::json!(["forbidden", "wrong_password"]));
    }

    #[test]
    fn the_document_is_openapi_3_1_with_bearer_auth() {
        let v: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            v["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        assert!(v["paths"]["/api/v1/openapi.json"]["get"].is_object());
    }
}
