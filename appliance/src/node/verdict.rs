//! The staff verdict: one word-and-colour answer to "is this box fine, and what do I do?",
//! computed once on the appliance and put into the `/status` JSON as `verdict`, so the status
//! page, `comatching-appliance status` and the tty1 view (`status --watch`) never disagree.
//!
//! Sans-IO: [`StatusView`] is a small typed view of the status document
//! ([`StatusView::from_doc`] reads it from the JSON, tolerating missing fields), and
//! [`verdict`] is a pure function of it. The rules, first match wins:
//!
//! 1. `ready` (the replica's own readiness rule) → [`State::Ready`]. Nothing else is ever Ready.
//! 2. the store cannot be opened or created → Not serving (`store_unavailable`), check the disk;
//! 3. a sync change cannot be saved (`sync.stuck`) → Not serving (`stuck`), check the disk;
//! 4. no broker connection → Broker unreachable, check the network;
//! 5. the replica was found damaged and is being rebuilt → Replica damaged, rebuilding; wait;
//! 6. connected for [`RELAY_SILENT_AFTER_S`] without an answer from the relay → Not serving
//!    (`relay_silent`), tell the relay operator;
//! 7. otherwise (behind, a gap, a snapshot loading, waiting for the relay's first answer) →
//!    Catching up, with how many changes behind when known; wait.
//!
//! Disk problems come before the broker because a box that cannot write will not heal when the
//! network does; the broker comes before "damaged" because a rebuild needs the broker.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Connected this long without a `HelloAck` and the relay counts as silent (a replay or snapshot
/// of 100k users takes a few seconds, so a minute is no false alarm).
pub const RELAY_SILENT_AFTER_S: u64 = 60;

/// What the verdict needs to know, read from the status document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusView {
    /// The readiness rule's answer (`ready`).
    pub ready: bool,
    pub broker_connected: bool,
    /// `relay_seq - applied_seq` (`lag`).
    pub lag: u64,
    /// A gap in the sync stream is waiting for a replay (`sync.gap`).
    pub gap: bool,
    /// A snapshot is being staged (`sync.snapshot_in_progress`).
    pub loading_snapshot: bool,
    /// The seq the replica is halted at because it cannot commit it (`sync.stuck.seq`).
    pub stuck_seq: Option<u64>,
    /// Seconds connected to the broker without the relay's `HelloAck`
    /// (`sync.waiting_for_relay_s`); `None` once it answered or while disconnected.
    pub relay_silent_s: Option<u64>,
    /// The replica was found damaged, moved aside and is being rebuilt from the relay
    /// (`store.healed.rebuilding`).
    pub replica_damaged: bool,
    /// The store cannot be opened or created, e.g. a read-only or full disk
    /// (`store.state == "unavailable"`).
    pub store_unavailable: bool,
}

impl StatusView {
    /// Reads the view from a `/status` document. Missing or mistyped fields read as the
    /// harmless value (not ready, not connected, nothing wrong), so an older or newer document
    /// still gets a verdict.
    pub fn from_doc(doc: &Value) -> StatusView {
        let sync = &doc["sync"];
        StatusView {
            ready: doc["ready"].as_bool().unwrap_or(false),
            broker_connected: doc["broker_connected"].as_bool().unwrap_or(false),
            lag: doc["lag"].as_u64().unwrap_or(0),
            gap: !sync["gap"].is_null(),
            loading_snapshot: !sync["snapshot_in_progress"].is_null(),
            stuck_seq: sync["stuck"]["seq"].as_u64(),
            relay_silent_s: sync["waiting_for_relay_s"].as_u64(),
            replica_damaged: doc["store"]["healed"]["rebuilding"]
                .as_bool()
                .unwrap_or(false),
            store_unavailable: doc["store"]["state"].as_str() == Some("unavailable"),
        }
    }
}

/// The five answers staff can get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Ready,
    CatchingUp,
    NotServing,
    BrokerUnreachable,
    ReplicaDamaged,
}

/// Why a box is not serving (only with [`State::NotServing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    StoreUnavailable,
    Stuck,
    RelaySilent,
}

/// What staff should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing to do; power-cycling is safe.
    SafeToReboot,
    /// Nothing: it heals by itself within a minute.
    Wait,
    /// Check the network cable and Tailscale.
    CheckNetwork,
    /// Check the disk (free space), then reboot; tell the relay operator if it stays.
    CheckDisk,
    /// Tell the relay operator.
    TellRelayOperator,
}

/// The verdict, as it appears in the JSON: `{state, behind, reason, action}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub state: State,
    /// Changes behind the relay, with [`State::CatchingUp`] when known; otherwise `None`.
    pub behind: Option<u64>,
    /// With [`State::NotServing`] only.
    pub reason: Option<Reason>,
    pub action: Action,
}

impl Verdict {
    fn of(state: State, behind: Option<u64>, reason: Option<Reason>) -> Verdict {
        let action = match (state, reason) {
            (State::Ready, _) => Action::SafeToReboot,
            (State::CatchingUp | State::ReplicaDamaged, _) => Action::Wait,
            (State::BrokerUnreachable, _) => Action::CheckNetwork,
            (State::NotServing, Some(Reason::RelaySilent)) => Action::TellRelayOperator,
            (State::NotServing, _) => Action::CheckDisk,
        };
        Verdict {
            state,
            behind,
            reason,
            action,
        }
    }

    pub fn to_json(self) -> Value {
        serde_json::to_value(self).expect("plain enums and numbers")
    }
}

/// The verdict for a status view (rules in the module comment).
pub fn verdict(v: &StatusView) -> Verdict {
    if v.ready {
        return Verdict::of(State::Ready, None, None);
    }
    if v.store_unavailable {
        return Verdict::of(State::NotServing, None, Some(Reason::StoreUnavailable));
    }
    if v.stuck_seq.is_some() {
        return Verdict::of(State::NotServing, None, Some(Reason::Stuck));
    }
    if !v.broker_connected {
        return Verdict::of(State::BrokerUnreachable, None, None);
    }
    if v.replica_damaged {
        return Verdict::of(State::ReplicaDamaged, None, None);
    }
    if v.relay_silent_s.is_some_and(|s| s >= RELAY_SILENT_AFTER_S) {
        return Verdict::of(State::NotServing, None, Some(Reason::RelaySilent));
    }
    let behind = (v.lag > 0).then_some(v.lag);
    Verdict::of(State::CatchingUp, behind, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn connected() -> StatusView {
        StatusView {
            broker_connected: true,
            ..StatusView::default()
        }
    }

    #[test]
    fn each_state_with_its_action() {
        let ready = StatusView {
            ready: true,
            ..connected()
        };
        assert_eq!(verdict(&ready), Verdict::of(State::Ready, None, None));
        assert_eq!(verdict(&ready).action, Action::SafeToReboot);

        let behind = StatusView {
            lag: 42,
            ..connected()
        };
        let v = verdict(&behind);
        assert_eq!(
            (v.state, v.behind, v.action),
            (State::CatchingUp, Some(42), Action::Wait)
        );

        let loading = StatusView {
            loading_snapshot: true,
            ..connected()
        };
        assert_eq!(verdict(&loading).state, State::CatchingUp);
        assert_eq!(verdict(&loading).behind, None);

        let offline = StatusView::default();
        assert_eq!(verdict(&offline).state, State::BrokerUnreachable);
        assert_eq!(verdict(&offline).action, Action::CheckNetwork);

        let stuck = StatusView {
            stuck_seq: Some(7),
            ..connected()
        };
        assert_eq!(verdict(&stuck).reason, Some(Reason::Stuck));
        assert_eq!(verdict(&stuck).action, Action::CheckDisk);

        let damaged = StatusView {
            replica_damaged: true,
            ..connected()
        };
        assert_eq!(verdict(&damaged).state, State::ReplicaDamaged);
        assert_eq!(verdict(&damaged).action, Action::Wait);

        let no_store = StatusView {
            store_unavailable: true,
            ..StatusView::default()
        };
        assert_eq!(verdict(&no_store).reason, Some(Reason::StoreUnavailable));
    }

    #[test]
    fn a_quiet_relay_is_catching_up_for_a_minute_then_not_serving() {
        let waiting = |s| StatusView {
            relay_silent_s: Some(s),
            ..connected()
        };
        assert_eq!(verdict(&waiting(5)).state, State::CatchingUp);
        assert_eq!(
            verdict(&waiting(RELAY_SILENT_AFTER_S - 1)).state,
            State::CatchingUp
        );
        let v = verdict(&waiting(RELAY_SILENT_AFTER_S));
        assert_eq!(v.reason, Some(Reason::RelaySilent));
        assert_eq!(v.action, Action::TellRelayOperator);
    }

    #[test]
    fn reads_the_status_document() {
        let doc = json!({
            "ready": false, "broker_connected": true, "lag": 12,
            "sync": {"gap": {"from": 3, "to": 9}, "snapshot_in_progress": null,
                     "stuck": {"seq": 4, "error": "disk full"}, "waiting_for_relay_s": 3},
        });
        assert_eq!(
            StatusView::from_doc(&doc),
            StatusView {
                ready: false,
                broker_connected: true,
                lag: 12,
                gap: true,
                loading_snapshot: false,
                stuck_seq: Some(4),
                relay_silent_s: Some(3),
                replica_damaged: false,
                store_unavailable: false,
            }
        );
        // Nothing at all: not ready, not connected.
        assert_eq!(
            verdict(&StatusView::from_doc(&json!({}))).state,
            State::BrokerUnreachable
        );
    }

    #[test]
    fn serialises_as_the_status_json_field() {
        let v = verdict(&StatusView {
            lag: 3,
            ..connected()
        });
        assert_eq!(
            v.to_json(),
            json!({"state": "catching_up", "behind": 3, "reason": null, "action": "wait"})
        );
        let v = verdict(&StatusView {
            relay_silent_s: Some(600),
            ..connected()
        });
        assert_eq!(
            v.to_json(),
            json!({"state": "not_serving", "behind": null, "reason": "relay_silent",
                   "action": "tell_relay_operator"})
        );
    }

    fn any_view() -> impl Strategy<Value = StatusView> {
        (
            (any::<bool>(), any::<bool>(), 0u64..5, any::<bool>()),
            (any::<bool>(), proptest::option::of(0u64..100)),
            (
                proptest::option::of(0u64..200),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (ready, broker_connected, lag, gap),
                    (loading_snapshot, stuck_seq),
                    (relay_silent_s, replica_damaged, store_unavailable),
                )| StatusView {
                    ready,
                    broker_connected,
                    lag,
                    gap,
                    loading_snapshot,
                    stuck_seq,
                    relay_silent_s,
                    replica_damaged,
                    store_unavailable,
                },
            )
    }

    proptest! {
        /// "Ready" exactly when the readiness rule says so.
        #[test]
        fn ready_only_when_ready(v in any_view()) {
            prop_assert_eq!(verdict(&v).state == State::Ready, v.ready);
        }

        /// The verdict is internally consistent: a reason only with Not serving (and always
        /// there), a count only with Catching up and equal to the lag, the action the state's.
        #[test]
        fn fields_agree_with_the_state(v in any_view()) {
            let out = verdict(&v);
            prop_assert_eq!(out.reason.is_some(), out.state == State::NotServing);
            prop_assert!(out.behind.is_none() || out.state == State::CatchingUp);
            if let Some(n) = out.behind {
                prop_assert!(n > 0 && n == v.lag);
            }
            prop_assert_eq!(out, Verdict::of(out.state, out.behind, out.reason));
        }

        /// A box that cannot write is told to check its disk whatever else is wrong; a box
        /// without a broker (and with a working disk) is told to check the network.
        #[test]
        fn the_more_basic_problem_wins(v in any_view()) {
            let out = verdict(&v);
            if !v.ready && (v.store_unavailable || v.stuck_seq.is_some()) {
                prop_assert_eq!(out.action, Action::CheckDisk);
            } else if !v.ready && !v.broker_connected {
                prop_assert_eq!(out.state, State::BrokerUnreachable);
            }
        }

        /// The JSON form round-trips through the reader for every field it reads.
        #[test]
        fn from_doc_reads_back_what_it_is_given(v in any_view()) {
            let doc = json!({
                "ready": v.ready, "broker_connected": v.broker_connected, "lag": v.lag,
                "sync": {
                    "gap": if v.gap { json!({"from": 1, "to": 2}) } else { Value::Null },
                    "snapshot_in_progress": if v.loading_snapshot { json!(5) } else { Value::Null },
                    "stuck": v.stuck_seq.map(|s| json!({"seq": s})),
                    "waiting_for_relay_s": v.relay_silent_s,
                },
                "store": {
                    "state": if v.store_unavailable { "unavailable" } else { "open" },
                    "healed": if v.replica_damaged { json!({"rebuilding": true}) } else { Value::Null },
                },
            });
            let read = StatusView::from_doc(&doc);
            prop_assert_eq!(read, v);
        }
    }
}
