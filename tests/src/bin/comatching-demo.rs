//! `comatching-demo`: the README's first command runs this (through `scripts/demo.sh`). It
//! starts a relay and two appliances on the local broker, registers 2,000 synthetic students
//! through the API, gives them points the booth's way (a charge request each, approved by the
//! operator), runs 200 matches, prints a summary and the URLs, and keeps
//! everything running until Ctrl-C, which stops everything it started. Every broker message is
//! authenticated with a link key made for the run (`comatching-relay pki link-key`), as in a
//! deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comatching_tests::world::{World, WorldOptions, drive_matches};

fn main() {
    comatching_tests::process::point_at_sibling_binaries();
    let users: usize = std::env::var("DEMO_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let matches: usize = std::env::var("DEMO_MATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut opts = WorldOptions::new("demo");
        opts.appliances = 2;
        let keys = tempfile::tempdir().expect("key dir");
        opts.link_key = Some(comatching_tests::relay::new_link_key(keys.path()));
        println!("starting the relay and two appliances…");
        let mut world = World::start(&opts).await;
        println!("registering {users} students through the API…");
        let t = Instant::now();
        let people = world.register(users, 32, 2026).await;
        println!("  done in {:.1}s; each files a 10,000-point charge request and the operator approves it", t.elapsed().as_secs_f64());
        world.charge_all_via_booth(&people, 10_000, 32).await;
        let pool = world.wait_converged(Duration::from_secs(300)).await;
        println!("  both appliances hold all {} matchable students (digest {}); every broker message carried a link-key HMAC", pool.count, pool.digest);

        println!("running {matches} matches…");
        let (lat, errs) = drive_matches(Arc::new(people), 8, Duration::from_secs(300), Some(matches), 7).await;
        let stats = world.operator.stats().await;
        // The relay's view of each appliance comes from its hellos (one a second here): wait for
        // the first one after the matches, so the summary shows where they are now.
        let mut appliances = world.operator.user.get("/api/v1/admin/appliances").await.expect(200);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline
            && !appliances["appliances"].as_array().into_iter().flatten().all(|a| {
                a["ready"] == true && a["applied_seq"] == appliances["relay_seq"]
            })
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            appliances = world.operator.user.get("/api/v1/admin/appliances").await.expect(200);
        }
        println!();
        println!("== summary ==");
        println!("matches made:        {}", lat.len());
        println!("other answers:       {errs:?} (404 = nobody suitable left for those options; nobody was charged)");
        println!("points granted:      {}", stats["points_granted"]);
        println!("points spent:        {}", stats["points_spent"]);
        println!("open holds:          {}", stats["open_holds"]);
        for a in appliances["appliances"].as_array().into_iter().flatten() {
            println!(
                "appliance {:<8} applied_seq {} (relay {}), ready {}",
                a["appliance_id"].as_str().unwrap_or("?"),
                a["applied_seq"],
                appliances["relay_seq"],
                a["ready"]
            );
        }
        println!();
        println!("relay API:           {}/api/v1  (operator: operator / \"{}\")", world.relay.base_url(), comatching_tests::api::PASSWORD);
        for a in &world.appliances {
            println!("appliance status:    http://{}/status", a.config().http.listen);
        }
        println!("relay metrics:       {}/metrics", world.relay.base_url());
        println!("booth's live queue:  {}/api/v1/admin/charges/events  (SSE, operator token)", world.relay.base_url());
        println!();
        println!("running; press Ctrl-C to stop everything");
        let _ = tokio::signal::ctrl_c().await;
        println!("stopping");
    });
}
