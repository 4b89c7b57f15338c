//! A festival's traffic in miniature, for drills (the restore drill of issue 14): workers that
//! each repeat a seeded mix of [`Step`]s — sign-ups with a profile, booth grants, match
//! requests — against a running relay until stopped, recording every answer.
//!
//! A new kind of traffic is one more [`Step`] variant, its weight in [`Step::MIX`] and its arm
//! in [`Worker::run_step`]; whatever it records goes into [`Recorded`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::api::{Api, Operator, User};
use crate::checker::{Answer, History};
use crate::population::Population;

/// One thing a student or an operator does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A new account and its profile.
    Register,
    /// The booth grants points to an existing student.
    Grant,
    /// A student asks for a match (with a fresh idempotency key).
    Match,
}

impl Step {
    /// Relative weights: mostly matches, as on the day.
    pub const MIX: &'static [(Step, u32)] =
        &[(Step::Match, 6), (Step::Grant, 2), (Step::Register, 2)];

    fn pick(pop: &mut Population) -> Step {
        let total: u32 = Step::MIX.iter().map(|(_, w)| w).sum();
        let mut r = pop.pick(total as usize) as u32;
        for &(step, w) in Step::MIX {
            if r < w {
                return step;
            }
            r -= w;
        }
        Step::Match
    }
}

/// What the load did, as the clients saw it.
#[derive(Clone, Default)]
pub struct Recorded {
    /// Every match answer (user, key, status, body).
    pub matches: History,
    /// Accounts created (user ids), whatever happened to them later.
    pub registered: Arc<Mutex<Vec<String>>>,
    /// Grants the relay answered 201: (user id, amount).
    pub grants: Arc<Mutex<Vec<(String, i64)>>>,
    /// Match answers with status 201 so far.
    pub matched: Arc<AtomicUsize>,
}

/// Running workers; [`MixedLoad::stop`] ends them.
pub struct MixedLoad {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub recorded: Recorded,
}

struct Worker {
    id: usize,
    api: Api,
    operator: Operator,
    users: Arc<Vec<User>>,
    pop: Population,
    n: usize,
    recorded: Recorded,
}

impl Worker {
    async fn run_step(&mut self, step: Step) {
        self.n += 1;
        match step {
            Step::Register => {
                let name = format!("mix{}_{}", self.id, self.n);
                let profile = self.pop.profile(self.n);
                let r = self.api.create_account(&name, crate::world::PASSWORD).await;
                if r.status == 201 {
                    let body = r.expect(201);
                    let token = body["token"].as_str().unwrap_or_default().to_owned();
                    let user_id = body["user_id"].as_str().unwrap_or_default().to_owned();
                    let user = User {
                        api: self.api.clone(),
                        username: name,
                        password: crate::world::PASSWORD.to_owned(),
                        user_id: user_id.clone(),
                        token,
                    };
                    let _ = user.put_profile_json(&profile).await;
                    self.recorded
                        .registered
                        .lock()
                        .expect("registered")
                        .push(user_id);
                }
            }
            Step::Grant => {
                let u = &self.users[self.pop.pick(self.users.len())];
                let r = self.operator.grant_resp(&u.user_id, 500, "booth").await;
                if r.status == 201 {
                    self.recorded
                        .grants
                        .lock()
                        .expect("grants")
                        .push((u.user_id.clone(), 500));
                }
            }
            Step::Match => {
                let u = self.users[self.pop.pick(self.users.len())].clone();
                let body = self.pop.match_options();
                let key = format!("mix-{}-{}", self.id, self.n);
                let a: Answer = self.recorded.matches.post_match(&u, &key, &body).await;
                if a.status == 201 {
                    self.recorded.matched.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

impl MixedLoad {
    /// Starts `workers` workers acting for `users` (matches and grants) and signing up new
    /// students, with the operator's token for grants.
    pub fn start(
        api: &Api,
        operator: &Operator,
        users: Arc<Vec<User>>,
        workers: usize,
        seed: u64,
    ) -> MixedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Recorded::default();
        let tasks = (0..workers)
            .map(|id| {
                let mut w = Worker {
                    id,
                    api: api.clone(),
                    operator: Operator {
                        user: operator.user.clone(),
                    },
                    users: users.clone(),
                    pop: Population::new(seed ^ ((id as u64 + 1) << 32)),
                    n: 0,
                    recorded: recorded.clone(),
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let step = Step::pick(&mut w.pop);
                        w.run_step(step).await;
                    }
                })
            })
            .collect();
        MixedLoad {
            stop,
            tasks,
            recorded,
        }
    }

    /// Match answers with status 201 so far.
    pub fn matched(&self) -> usize {
        self.recorded.matched.load(Ordering::SeqCst)
    }

    /// Waits (within `timeout`) until at least `n` matches succeeded.
    pub async fn wait_matched(&self, n: usize, timeout: std::time::Duration) {
        crate::wait_until(
            timeout,
            &format!("{n} matches made by the load"),
            || async { self.matched() >= n },
        )
        .await;
    }

    /// Stops every worker after its current step; returns what was recorded.
    pub async fn stop(self) -> Recorded {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load worker");
        }
        self.recorded
    }
}
