//! `comatching-relay`: the cloud relay. It owns the truth (accounts, profiles, the points
//! ledger, match history) in SQLite, serves the web app's API, publishes every change to the
//! matchable pool through the outbox, and asks appliances for matches over the broker.
//!
//! Module map: `config` (settings), `db` (SQLite, schema), `error` (codes ↔ HTTP), `auth`
//! (passwords, sessions), `profiles` (profile validation + pool membership), `ledger` (points),
//! `outbox` (ordered change log + publisher), `control` (hellos → replay/snapshot, appliance
//! tracking, outbox trimming), `broker` (connection supervisor), `rpc` (match
//! request/reply client), `matching` (the match flow + sweeper), `limits` (rate limits by route
//! class, client address behind proxies), `metrics` (Prometheus text), `http` (routes, CORS,
//! response headers), `openapi` (the generated OpenAPI document), `listener` (the accept loop:
//! connection cap, timeouts), `tls` (HTTPS configuration), `pki` (the
//! private CA behind `comatching-relay pki`), `server` (wiring it all together), `backup` (online backup and restore),
//! `datadir` (the data directory's lock), `erasure` (withdrawal and purge erase personal data), `charges` (the booth's charge
//! requests: rules and state machine), `events` (the live-event log and its SSE streams), `booth`
//! (the charge, ledger-history and user look-up routes), `report` (`admin report`: the festival's
//! money, reconciled), `dead_letters` (counting dead letters; retiring an appliance).

pub mod auth;
pub mod backup;
pub mod booth;
pub mod broker;
pub mod charges;
pub mod config;
pub mod console;
pub mod control;
pub mod datadir;
pub mod db;
pub mod dead_letters;
pub mod erasure;
pub mod error;
pub mod events;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod listener;
pub mod matching;
pub mod metrics;
pub mod openapi;
pub mod outbox;
pub mod pki;
pub mod profiles;
pub mod report;
pub mod rpc;
pub mod server;
pub mod tls;
