//! `comatching-relay` — the cloud relay's command line: `serve`, `migrate`, `admin`, `openapi`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comatching_relay::config::Config;
use comatching_relay::db::Db;
use comatching_relay::server;

#[derive(Parser)]
#[command(
    name = "comatching-relay",
    version,
    about = "COMAtching Edge cloud relay"
)]
struct Cli {
    /// TOML configuration file; every key may also be set as COMATCHING_RELAY__SECTION__KEY.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API, the outbox publisher, the match RPC client and the hold sweeper.
    Serve,
    /// Create or upgrade the database, then exit.
    Migrate,
    /// Takes a consistent, checked copy of the database while the relay serves; prints one JSON
    /// line (path, bytes, seconds, epoch, outbox_seq, users, balance_total, …).
    Backup {
        /// Directory the backup is written to (created if missing).
        #[arg(long)]
        to: PathBuf,
        /// Keep the newest N backups in DIR, delete older ones.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
    },
    /// Installs a backup as the database (the relay must be stopped); the current one is moved
    /// aside, never deleted, and a new epoch starts.
    Restore {
        /// A backup file (`relay-….db`).
        file: PathBuf,
    },
    /// Operator helpers.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Prints the API's OpenAPI 3.1 document (as served at /api/v1/openapi.json); no
    /// configuration needed. `docs/openapi.json` is its output.
    Openapi,
    /// The private CA: certificates for HTTPS and for AMQP over TLS.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Mints a CA into DIR (ca.pem, ca.key); refuses if one is there.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "COMAtching Edge private CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issues NAME.pem and NAME.key in DIR, signed by its CA.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Common name and file stem (for a client certificate: the identity, e.g. the broker user).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        kind: comatching_relay::pki::Kind,
        /// A DNS name the server answers to (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address the server answers on (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 397)]
        days: u32,
    },
    /// Writes a fresh link key to DIR/link.key (for broker.link_key_file on every service).
    LinkKey {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Give an existing account the operator role.
    GrantOperator { username: String },
    /// Start a new lineage after restoring the database from a backup: appliances see the new
    /// epoch at their next hello and reload everything from a snapshot instead of mixing
    /// histories. Run it with the relay stopped, before starting it on the restored copy.
    NewEpoch,
    /// After the festival, with the relay stopped: erase the personal fields of every account
    /// not active since DATE (YYYY-MM-DD, UTC, or an RFC 3339 time), keeping the ledger and
    /// match counts; prints one JSON line.
    Purge {
        #[arg(long, value_name = "DATE", value_parser = comatching_relay::erasure::parse_before)]
        before: i64,
    },
    /// An appliance that is gone for good (re-imaged with a new id, a test box): deletes its
    /// sync queue on the broker and its tracking row, so the broker stops collecting every
    /// change for it and the outbox retention stops waiting for it. Stop the appliance first
    /// (refused, exit 4, while it consumes its queue). Prints one JSON line; exit 2 for an
    /// invalid id, 3 when there was nothing to retire.
    RetireAppliance { id: String },
    /// The festival's money: approved charge requests per operator per day, grants by reason,
    /// points spent on matches, refunds, open holds, and their reconciliation with the ledger.
    /// Safe while the relay serves. Exit 4 when the totals do not reconcile.
    Report {
        /// From this date (YYYY-MM-DD, UTC, or an RFC 3339 time), inclusive.
        #[arg(long, value_name = "DATE", value_parser = comatching_relay::erasure::parse_before)]
        from: Option<i64>,
        /// Up to this date: a bare date includes that whole day.
        #[arg(long, value_name = "DATE", value_parser = comatching_relay::report::parse_to)]
        to: Option<i64>,
        #[arg(long, value_enum)]
        format: ReportFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Csv,
    Json,
}

/// At most two malloc arenas (glibc). glibc gives each thread that contends for the heap an
/// arena of its own, up to 8 per core; the relay's blocking pool runs dozens of threads, and
/// each arena keeps what a burst freed. At 100k users the peak RSS (during a burst of profile
/// writes and a snapshot) was 63.5–66.3 MB with the default and 53.6 MB with two arenas, on a
/// box with 1 GiB for everything. Must run before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    const M_ARENA_MAX: std::ffi::c_int = -8;
    unsafe extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
    // while this is the only thread.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn,amq_protocol=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Pki { command } = cli.command {
        return pki(command);
    }
    if let Command::Openapi = cli.command {
        print!("{}", comatching_relay::openapi::document_json());
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comatching-relay: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve => {
            tracing::info!(config = %cfg.masked(), "effective configuration");
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("comatching-relay: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(server::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("comatching-relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pki { .. } | Command::Openapi => {
            unreachable!("handled before the configuration is loaded")
        }
        Command::Backup { to, keep } => backup(&cfg, &to, keep),
        Command::Restore { file } => restore(&cfg, &file),
        Command::Admin {
            command: AdminCommand::Purge { before },
        } => purge(&cfg, before),
        Command::Admin {
            command: AdminCommand::RetireAppliance { id },
        } => retire_appliance(&cfg, &id),
        Command::Admin {
            command: AdminCommand::Report { from, to, format },
        } => report(&cfg, from, to, format),
        Command::Migrate => match Db::open(&cfg.storage.db_path()) {
            Ok(_) => {
                println!("database ready at {}", cfg.storage.db_path().display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("comatching-relay: migrate failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Admin {
            command: AdminCommand::NewEpoch,
        } => {
            let db = match Db::open(&cfg.storage.db_path()) {
                Ok(db) => db,
                Err(e) => {
                    eprintln!("comatching-relay: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match db.run_sync(comatching_relay::db::renew_epoch) {
                Ok(epoch) => {
                    println!("new epoch {epoch:016x}: appliances will resync from a snapshot");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("comatching-relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Admin {
            command: AdminCommand::GrantOperator { username },
        } => {
            let db = match Db::open(&cfg.storage.db_path()) {
                Ok(db) => db,
                Err(e) => {
                    eprintln!("comatching-relay: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let changed = db.run_sync(|c| {
                Ok(c.execute(
                    "UPDATE accounts SET role = 'operator' WHERE username = ?1 AND withdrawn_ms IS NULL",
                    [&username],
                )?)
            });
            match changed {
                Ok(1) => {
                    println!("{username} is now an operator");
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("comatching-relay: no active account named {username}");
                    ExitCode::from(3)
                }
                Err(e) => {
                    eprintln!("comatching-relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `pki init|issue`: no configuration needed; errors print their stable code.
fn pki(command: PkiCommand) -> ExitCode {
    use comatching_relay::pki;
    let done = match command {
        PkiCommand::Init { dir, name, days } => pki::init_dir(&dir, &name, days).map(|cert| {
            println!(
                "CA written: {} (its key, {}, never leaves this machine)",
                cert.display(),
                dir.join(pki::CA_KEY).display()
            );
        }),
        PkiCommand::Issue {
            dir,
            name,
            kind,
            dns,
            ip,
            days,
        } => {
            let spec = pki::LeafSpec {
                name,
                kind,
                dns,
                ips: ip,
                days,
            };
            pki::issue_into_dir(&dir, &spec).map(|(cert, key)| {
                println!("issued: {} and {}", cert.display(), key.display());
            })
        }
        PkiCommand::LinkKey { dir } => pki::link_key_into_dir(&dir).map(|path| {
            println!(
                "link key written: {} (copy it to every relay and appliance)",
                path.display()
            );
        }),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comatching-relay: {}: {e}", e.code());
            ExitCode::from(2)
        }
    }
}

/// `backup`: one JSON line on stdout; exit 1 with the reason on stderr.
fn backup(cfg: &Config, to: &std::path::Path, keep: Option<u32>) -> ExitCode {
    match comatching_relay::backup::backup(&cfg.storage.db_path(), to, keep.map(|k| k as usize)) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("comatching-relay: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `restore`: what was restored and what to tell students; exit 3 while a relay serves.
fn restore(cfg: &Config, file: &std::path::Path) -> ExitCode {
    use comatching_relay::backup::BackupError;
    match comatching_relay::backup::restore(&cfg.storage.data_dir, file) {
        Ok(report) => {
            print!("{}", report.explain());
            ExitCode::SUCCESS
        }
        Err(e @ BackupError::Serving(_)) => {
            eprintln!("comatching-relay: restore refused: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("comatching-relay: restore failed, nothing was changed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `admin retire-appliance ID`: queue first (refused while the appliance consumes it), then the
/// tracking row; exit 2 invalid id, 3 nothing to retire, 4 still connected, 1 other failures.
fn retire_appliance(cfg: &Config, raw: &str) -> ExitCode {
    use comatching_relay::dead_letters::{self, RetireError, Retired};
    let id = match dead_letters::parse_id(raw) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("comatching-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("comatching-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (queue_deleted, messages_dropped) =
        match rt.block_on(dead_letters::delete_sync_queue(&cfg.broker, &id)) {
            Ok(r) => r,
            Err(e @ RetireError::Connected { .. }) => {
                eprintln!("comatching-relay: retire refused: {e}");
                return ExitCode::from(4);
            }
            Err(e) => {
                eprintln!("comatching-relay: retire failed: {e}");
                return ExitCode::FAILURE;
            }
        };
    let db = match Db::open(&cfg.storage.db_path()) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("comatching-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let appliance = id.as_str().to_owned();
    let rows = match db.run_sync(move |c| {
        Ok(c.execute(
            "DELETE FROM appliances WHERE appliance_id = ?1",
            [&appliance],
        )?)
    }) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("comatching-relay: retire failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = Retired {
        appliance_id: id.as_str().to_owned(),
        queue: comatching_protocol::topology::sync_queue(id.as_str()),
        queue_deleted,
        messages_dropped,
        tracking_row_deleted: rows > 0,
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if !queue_deleted && rows == 0 {
        eprintln!(
            "comatching-relay: nothing to retire: no queue {} and no tracking row",
            report.queue
        );
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}

/// `admin purge --before DATE`: refuses while a relay serves (exit 3); one JSON line.
fn purge(cfg: &Config, before_ms: i64) -> ExitCode {
    let _lock = match comatching_relay::datadir::lock(&cfg.storage.data_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("comatching-relay: purge refused: {e}");
            return ExitCode::from(3);
        }
    };
    if !cfg.storage.db_path().is_file() {
        eprintln!(
            "comatching-relay: no relay database at {}",
            cfg.storage.db_path().display()
        );
        return ExitCode::FAILURE;
    }
    let db = match Db::open(&cfg.storage.db_path()) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("comatching-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = db.run_sync(|c| {
        let report = comatching_relay::erasure::purge(c, before_ms)?;
        comatching_relay::erasure::truncate_wal(c)?;
        Ok(report)
    });
    match done {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("comatching-relay: purge failed, nothing was changed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `admin report`: reads one consistent snapshot (read-only, beside a serving relay); exit 4
/// when the money does not reconcile, 1 on any other failure.
fn report(cfg: &Config, from: Option<i64>, to: Option<i64>, format: ReportFormat) -> ExitCode {
    use rusqlite::{Connection, OpenFlags};
    let path = cfg.storage.db_path();
    let run = || -> Result<comatching_relay::report::Report, String> {
        let mut c = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        c.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let version: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if version != comatching_relay::db::SCHEMA_VERSION {
            return Err(format!(
                "the database is at schema {version}, this build reads {}: run `comatching-relay migrate`",
                comatching_relay::db::SCHEMA_VERSION
            ));
        }
        let tx = c.transaction().map_err(|e| e.to_string())?;
        comatching_relay::report::build(&tx, from, to).map_err(|e| e.to_string())
    };
    match run() {
        Ok(r) => {
            match format {
                ReportFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default())
                }
                ReportFormat::Csv => print!("{}", comatching_relay::report::to_csv(&r)),
            }
            if r.reconciliation.reconciled {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "comatching-relay: the report does not reconcile: {:?}",
                    r.reconciliation
                );
                ExitCode::from(4)
            }
        }
        Err(e) => {
            eprintln!("comatching-relay: report failed: {e}");
            ExitCode::FAILURE
        }
    }
}
