//! The API's OpenAPI document as a test oracle: which operations exist, and whether an answer
//! fits what the document promises for its route and status (validated with the `jsonschema`
//! crate against the document's own schemas, `$ref`s included).
//!
//! [`Contract::check`] is the one entry point the tests use; [`Recorder`] checks every answer of
//! a run and remembers which operations and statuses were seen, so a test can also insist that
//! its run covered every operation.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

use reqwest::Method;
use serde_json::Value;

use crate::api::{Api, Resp};
use crate::broker::workspace_root;

/// The HTTP methods an OpenAPI path item may hold that the relay could serve.
pub const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// An OpenAPI 3.1 document.
pub struct Contract {
    doc: Value,
}

/// Where the committed copy lives.
pub fn committed_path() -> PathBuf {
    workspace_root().join("docs/openapi.json")
}

impl Contract {
    pub fn new(doc: Value) -> Contract {
        Contract { doc }
    }

    /// `docs/openapi.json`.
    pub fn committed() -> Contract {
        let path = committed_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        Contract::new(serde_json::from_str(&text).expect("docs/openapi.json is JSON"))
    }

    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Every (method, path template) the document has, methods lowercase.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for m in METHODS {
                if item.get(m).is_some() {
                    out.insert((m.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    /// The template a concrete path matches (`/a/{id}` matches `/a/42`), if any.
    pub fn template_for(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let parts: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .find(|t| {
                let tp: Vec<&str> = t.split('/').collect();
                tp.len() == parts.len()
                    && tp.iter().zip(&parts).all(|(a, b)| {
                        (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b
                    })
            })
            .cloned()
    }

    /// Checks one answer against the document: the route and status must be documented, a JSON
    /// body must validate against that response's schema, a response documented without
    /// content must have no body. Returns what is wrong.
    pub fn check(&self, method: &str, path: &str, resp: &Resp) -> Result<(), String> {
        let method = method.to_ascii_lowercase();
        let template = self
            .template_for(path)
            .ok_or_else(|| format!("{method} {path}: no such path in the document"))?;
        let op = &self.doc["paths"][&template][&method];
        if !op.is_object() {
            return Err(format!("{method} {template}: not in the document"));
        }
        let status = resp.status.to_string();
        let documented = &op["responses"][&status];
        if !documented.is_object() {
            return Err(format!(
                "{method} {template}: status {status} is not documented (body {})",
                resp.text
            ));
        }
        let Some(content) = documented["content"].as_object() else {
            return if resp.text.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{method} {template} {status}: documented without a body, got {}",
                    resp.text
                ))
            };
        };
        let Some(media) = content.get("application/json") else {
            // Text (metrics): nothing to validate.
            return Ok(());
        };
        if resp.body.is_null() && resp.text.trim() != "null" {
            return Err(format!(
                "{method} {template} {status}: documented as JSON, got {:?}",
                resp.text
            ));
        }
        let schema = self.standalone(&media["schema"]);
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| {
            format!("{method} {template} {status}: the schema does not compile: {e}")
        })?;
        let errors: Vec<String> = validator
            .iter_errors(&resp.body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{method} {template} {status}: the body does not fit the document: {}\nbody: {}",
                errors.join("; "),
                resp.text
            ))
        }
    }

    /// Checks `value` against the document's component schema `name` (e.g. an SSE event's
    /// payload, which the document describes only in words).
    pub fn check_schema(&self, name: &str, value: &Value) -> Result<(), String> {
        let schema = self.standalone(&serde_json::json!({
            "$ref": format!("#/components/schemas/{name}")
        }));
        let validator = jsonschema::draft202012::new(&schema)
            .map_err(|e| format!("schema {name} does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{name}: {}\nvalue: {value}", errors.join("; ")))
        }
    }

    /// A schema from the document made self-contained: the document's components ride along,
    /// so `#/components/schemas/...` references resolve.
    fn standalone(&self, schema: &Value) -> Value {
        let mut s = schema.clone();
        if let Some(obj) = s.as_object_mut() {
            obj.insert("components".into(), self.doc["components"].clone());
        } else {
            s = serde_json::json!({ "allOf": [schema], "components": self.doc["components"] });
        }
        s
    }
}

/// Makes requests and checks every answer against a [`Contract`], remembering what it saw.
pub struct Recorder<'a> {
    pub contract: &'a Contract,
    pub api: Api,
    seen: Mutex<BTreeSet<(String, String, u16)>>,
    failures: Mutex<Vec<String>>,
}

impl<'a> Recorder<'a> {
    pub fn new(contract: &'a Contract, api: Api) -> Recorder<'a> {
        Recorder {
            contract,
            api,
            seen: Mutex::new(BTreeSet::new()),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// Checks an answer some other helper obtained.
    pub fn record(&self, method: &str, path: &str, resp: &Resp) {
        let template = self
            .contract
            .template_for(path)
            .unwrap_or_else(|| path.to_owned());
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_ascii_lowercase(), template, resp.status));
        if let Err(e) = self.contract.check(method, path, resp) {
            self.failures.lock().unwrap().push(e);
        }
    }

    /// A request through the recorder.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let resp = self
            .api
            .request(method.clone(), path, token, body, headers)
            .await;
        self.record(method.as_str(), path, &resp);
        resp
    }

    /// A raw-body request through the recorder.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let resp = self
            .api
            .raw(method.clone(), path, token, content_type, body, &[])
            .await;
        self.record(method.as_str(), path, &resp);
        resp
    }

    /// What answers did not fit the document.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Every (method, template, status) seen.
    pub fn seen(&self) -> BTreeSet<(String, String, u16)> {
        self.seen.lock().unwrap().clone()
    }

    /// Documented operations this run never called.
    pub fn uncovered(&self) -> Vec<(String, String)> {
        let seen: BTreeSet<(String, String)> =
            self.seen().into_iter().map(|(m, t, _)| (m, t)).collect();
        self.contract
            .operations()
            .into_iter()
            .filter(|op| !seen.contains(op))
            .collect()
    }
}
