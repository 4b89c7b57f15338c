//! `comatching-appliance`: the university box's replica of matching features and the matcher.
//!
//! Module map (I/O only at the edges):
//! * [`sync`] — the sans-IO sync state machine: which relay events to apply, how far the cursor
//!   moves, gaps and epoch changes. Pure.
//! * [`store`] — the durable replica (`ReplicaStore`, SQLite and sled backends) and the thin
//!   shell [`store::apply_batch`] that runs the state machine against a store.
//! * [`score`] — the matching score of DESIGN.md §4 as integer tables. Pure.
//! * [`engine`] — candidate ranking: the `exact` linear scan (oracle) and the `hnsw` bucket index
//!   with its planner; [`engine::answer`] turns a `MatchRequest` into a `MatchReply`.
//! * [`synth`] — seeded synthetic users and requests with the shapes in DOMAIN.md.
//! * [`bench`] — the `bench engine` / `bench store` measurements behind the CLI.
//! * [`node`] — the running appliance (`run`): broker link, readiness, status page, sd_notify.
//! * [`tailscale`] — the tailscale CLI probe for the status page and `doctor`.
//! * [`cli_ops`] — the `status`, `resync` and `doctor` subcommands.

pub mod bench;
pub mod cli_ops;
pub mod engine;
pub mod node;
pub mod score;
pub mod store;
pub mod sync;
pub mod synth;
pub mod tailscale;
