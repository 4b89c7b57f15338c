//! `comatching-appliance`: the appliance's command line. Each subcommand is a thin shell over the
//! library; `run`, `status`, `resync` and `doctor` join `bench` here as they are built.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comatching_appliance::engine::EngineKind;
use comatching_appliance::engine::hnsw::HnswConfig;
use comatching_appliance::node::config::Config;
use comatching_appliance::node::i18n::Lang;
use comatching_appliance::store::StoreBackend;
use comatching_appliance::{bench, cli_ops, node};

#[derive(Parser)]
#[command(
    name = "comatching-appliance",
    version,
    about = "COMAtching Edge appliance"
)]
struct Cli {
    /// TOML configuration file; every key may also be set as COMATCHING_APPLIANCE__SECTION__KEY.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance: replica, broker link, match serving, status page.
    Run,
    /// Print the running appliance's verdict and facts for people; exits 0 when it is serving
    /// matches, 1 when it is not, 3 when nothing answers on its status port.
    Status {
        /// Print the status document (JSON) instead.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every 2 s until interrupted (the appliance image runs this on tty1).
        #[arg(long)]
        watch: bool,
        /// `ko` or `en`; default: Korean when LC_ALL/LC_MESSAGES/LANG start with "ko", else
        /// English (the Linux console cannot draw Hangul).
        #[arg(long)]
        lang: Option<String>,
    },
    /// Wipe the local replica so the next start loads a fresh snapshot (stop the service first).
    Resync,
    /// Check tailscale, the broker, the data directory and the replica's integrity.
    Doctor,
    /// Measure the matching engine or the replica store; prints one JSON object.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Crash-test child: applies a seeded sync history to a store until done or killed.
    #[command(hide = true)]
    SyncDrill {
        #[arg(long)]
        backend: StoreBackend,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    Engine {
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "buckets")]
        engine: EngineKind,
        /// Planner threshold: pools larger than this use the HNSW graph (default: never).
        #[arg(long)]
        graph_above: Option<usize>,
        #[arg(long)]
        ef_search: Option<usize>,
        #[arg(long)]
        knbn: Option<usize>,
    },
    Store {
        #[arg(long, default_value = "sqlite")]
        backend: StoreBackend,
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Changes per durable commit.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Parent directory for the scratch store (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("comatching-appliance: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn,amq_protocol=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run => {
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tracing::info!(config = %cfg.masked(), "effective configuration");
            if let Some(note) = cfg.matching.engine.deprecation() {
                tracing::warn!("{note}");
            }
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("comatching-appliance: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(node::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("comatching-appliance: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { json, watch, lang } => {
            let lang = match lang.as_deref().map(Lang::parse) {
                None => None,
                Some(Some(l)) => Some(l),
                Some(None) => {
                    eprintln!("comatching-appliance: --lang must be \"ko\" or \"en\"");
                    return ExitCode::from(2);
                }
            };
            let mode = if json {
                cli_ops::StatusMode::Json
            } else if watch {
                cli_ops::StatusMode::Watch
            } else {
                cli_ops::StatusMode::Once
            };
            match load_config(cli.config.as_deref()) {
                Ok(cfg) => cli_ops::status(&cfg, mode, lang),
                Err(code) => code,
            }
        }
        Command::Resync => match load_config(cli.config.as_deref()) {
            Ok(cfg) => cli_ops::resync(&cfg),
            Err(code) => code,
        },
        Command::Doctor => match load_config(cli.config.as_deref()) {
            Ok(cfg) => cli_ops::doctor(&cfg),
            Err(code) => code,
        },
        Command::Bench { what } => match what {
            BenchCommand::Engine {
                users,
                queries,
                seed,
                engine,
                graph_above,
                ef_search,
                knbn,
            } => {
                let mut cfg = HnswConfig::default();
                cfg.graph_above_users = graph_above.unwrap_or(cfg.graph_above_users);
                cfg.ef_search = ef_search.unwrap_or(cfg.ef_search);
                cfg.knbn = knbn.unwrap_or(cfg.knbn);
                let report = bench::engine_bench(users, queries, seed, engine, cfg);
                println!("{}", serde_json::to_string(&report).expect("plain numbers"));
                ExitCode::SUCCESS
            }
            BenchCommand::Store {
                backend,
                users,
                batch,
                dir,
            } => {
                let parent = dir.unwrap_or_else(std::env::temp_dir);
                let scratch = parent.join(format!(
                    "comatching-bench-{}-{}",
                    backend.as_str(),
                    std::process::id()
                ));
                let result = bench::store_bench(backend, users, batch, &scratch);
                let _ = std::fs::remove_dir_all(&scratch);
                match result {
                    Ok(report) => {
                        println!("{}", serde_json::to_string(&report).expect("plain numbers"));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("bench store failed ({}): {e}", e.code());
                        ExitCode::FAILURE
                    }
                }
            }
        },
        Command::SyncDrill { backend, dir, seed } => match bench::sync_drill(backend, &dir, seed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sync drill failed ({}): {e}", e.code());
                ExitCode::FAILURE
            }
        },
    }
}
