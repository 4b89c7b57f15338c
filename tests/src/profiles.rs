//! Synthetic request bodies: profiles and match options with sensible defaults, changed one
//! field at a time by the tests. They produce JSON exactly as the web app would send it, so a
//! test can also break a field on purpose (`.set("age", json!(18))`).

use serde_json::{Value, json};

/// A `PUT /api/v1/me/profile` body. Defaults: a 22-year-old woman, ENFP, games, normal contact
/// frequency, Computer Science, with a kakao handle.
#[derive(Clone, Debug)]
pub struct ProfileBuilder {
    body: Value,
}

impl Default for ProfileBuilder {
    fn default() -> Self {
        ProfileBuilder {
            body: json!({
                "nickname": "sunny",
                "gender": "female",
                "age": 22,
                "mbti": "ENFP",
                "hobbies": ["game"],
                "contact_frequency": "normal",
                "major": "Computer Science",
                "song": "Hype Boy",
                "comment": "let's watch the fireworks",
                "contact": {"kind": "kakao", "handle": "sunny_22"},
                "dont_pick_me": false,
            }),
        }
    }
}

impl ProfileBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A woman (the default).
    pub fn female() -> Self {
        Self::default()
    }

    /// A man, otherwise the defaults.
    pub fn male() -> Self {
        Self::default()
            .gender("male")
            .nickname("minho")
            .contact("instagram", "minho.k")
    }

    /// Sets any top-level field to any JSON value (also invalid ones).
    pub fn set(mut self, field: &str, value: Value) -> Self {
        self.body[field] = value;
        self
    }

    /// Removes a top-level field.
    pub fn without(mut self, field: &str) -> Self {
        if let Some(o) = self.body.as_object_mut() {
            o.remove(field);
        }
        self
    }

    pub fn nickname(self, v: &str) -> Self {
        self.set("nickname", json!(v))
    }
    pub fn gender(self, v: &str) -> Self {
        self.set("gender", json!(v))
    }
    pub fn age(self, v: i64) -> Self {
        self.set("age", json!(v))
    }
    pub fn mbti(self, v: &str) -> Self {
        self.set("mbti", json!(v))
    }
    pub fn hobbies(self, v: &[&str]) -> Self {
        self.set("hobbies", json!(v))
    }
    pub fn contact_frequency(self, v: &str) -> Self {
        self.set("contact_frequency", json!(v))
    }
    pub fn major(self, v: &str) -> Self {
        self.set("major", json!(v))
    }
    pub fn song(self, v: &str) -> Self {
        self.set("song", json!(v))
    }
    pub fn comment(self, v: &str) -> Self {
        self.set("comment", json!(v))
    }
    pub fn contact(self, kind: &str, handle: &str) -> Self {
        self.set("contact", json!({"kind": kind, "handle": handle}))
    }
    pub fn dont_pick_me(self, v: bool) -> Self {
        self.set("dont_pick_me", json!(v))
    }

    pub fn json(&self) -> &Value {
        &self.body
    }
}

/// A `POST /api/v1/matches` body. Defaults: no preferences at all (cost: base only).
#[derive(Clone, Debug)]
pub struct MatchOptionsBuilder {
    body: Value,
}

impl Default for MatchOptionsBuilder {
    fn default() -> Self {
        MatchOptionsBuilder {
            body: json!({
                "age": "any",
                "mbti": "",
                "hobby": "any",
                "contact_frequency": "any",
                "exclude_same_major": false,
                "important": "none",
            }),
        }
    }
}

impl MatchOptionsBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(mut self, field: &str, value: Value) -> Self {
        self.body[field] = value;
        self
    }
    pub fn age(self, v: &str) -> Self {
        self.set("age", json!(v))
    }
    pub fn mbti(self, v: &str) -> Self {
        self.set("mbti", json!(v))
    }
    pub fn hobby(self, v: &str) -> Self {
        self.set("hobby", json!(v))
    }
    pub fn contact_frequency(self, v: &str) -> Self {
        self.set("contact_frequency", json!(v))
    }
    pub fn exclude_same_major(self, v: bool) -> Self {
        self.set("exclude_same_major", json!(v))
    }
    pub fn important(self, v: &str) -> Self {
        self.set("important", json!(v))
    }
    pub fn json(&self) -> &Value {
        &self.body
    }
}
