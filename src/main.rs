//! The `regmirror` command: parse arguments, load the configuration, run the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regmirror::config::{Config, ConfigError};

#[derive(Parser)]
#[command(version, about = "A pull-through cache for OCI container registries")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry mirror (the default command).
    Serve {
        /// Configuration file; without it the embedded default (config.yml) is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Re-hash every stored blob and report the corrupt ones (exit 1 if any, without
    /// --repair). Without --repair it only reads files, so it also runs beside a live server.
    Verify {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Remove corrupt blobs from the store and the index (and adopt verified files the
        /// index lost). Needs the store to itself: refused while a server runs on it, whose
        /// background scrub (storage.scrub) does the same.
        #[arg(long)]
        repair: bool,
    },
    /// Exit 0 if a plain-HTTP GET of the URL answers 2xx: the container HEALTHCHECK, since a
    /// scratch image has no curl.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:5000/healthz")]
        url: String,
        /// Seconds allowed for connecting and for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::load(path),
        None => Config::embedded(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve { config: None });
    match command {
        Command::Healthcheck { url, timeout } => {
            match healthcheck(&url, std::time::Duration::from_secs(timeout)) {
                Ok(status) => {
                    println!("{url}: {status}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("{url}: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match load(config.as_ref()) {
            // Credentials, certificates and htpasswd are read as `serve` would read them.
            Ok(config) => match regmirror::check(&config) {
                Ok(()) => {
                    println!("configuration ok");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(2)
                }
            },
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        },
        Command::Verify { config, repair } => match load(config.as_ref()) {
            Ok(config) => verify(&config, repair),
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("{err}");
                    return ExitCode::from(2);
                }
            };
            regmirror::telemetry::init(&config.log);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(regmirror::run(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "regmirror stopped");
                    eprintln!("regmirror: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `regmirror verify`: hashes at full speed (the operator asked for it now).
fn verify(config: &Config, repair: bool) -> ExitCode {
    use regmirror::storage::{self, scrub};
    let root = &config.storage.root;
    let mut limiter = scrub::Limiter::new(0);
    let report = if repair {
        let options = storage::Options {
            index_cache: config.storage.index_cache.0,
        };
        let store = match storage::Store::open_with(root, &options) {
            Ok((store, _)) => store,
            Err(storage::Error::Locked(lock)) => {
                eprintln!(
                    "{}: in use by a running regmirror (lock {}); its background scrub \
                     (storage.scrub) removes corrupt blobs while serving, or stop it and run \
                     verify --repair again",
                    root.display(),
                    lock.display()
                );
                return ExitCode::from(2);
            }
            Err(err) => {
                eprintln!("{}: {err}", root.display());
                return ExitCode::from(2);
            }
        };
        let get = || Some(store.clone());
        let passes = scrub::verify_unverified(&get, &mut limiter, &mut |_| {}).and_then(|found| {
            let indexed = scrub::scrub_index(&get, &mut limiter, true, &mut |_| {})?;
            Ok((found, indexed))
        });
        let flushed = passes.and_then(|found| {
            store.flush()?;
            Ok(found)
        });
        match flushed {
            Ok((found, indexed)) => {
                let mut corrupt = found.corrupt;
                corrupt.extend(indexed.corrupt);
                scrub::Report {
                    blobs: found.blobs + indexed.blobs,
                    bytes: found.bytes.saturating_add(indexed.bytes),
                    corrupt,
                    adopted: found.adopted,
                    stopped: false,
                }
            }
            Err(err) => {
                eprintln!("{}: {err}", root.display());
                return ExitCode::from(2);
            }
        }
    } else {
        match scrub::verify_files(root, &mut limiter) {
            Ok(report) => report,
            Err(err) => {
                eprintln!("{}: {err}", root.display());
                return ExitCode::from(2);
            }
        }
    };
    for digest in &report.corrupt {
        println!("corrupt {digest}{}", if repair { " (removed)" } else { "" });
    }
    println!(
        "{} blobs, {} bytes verified: {} corrupt",
        report.blobs,
        report.bytes,
        report.corrupt.len()
    );
    if report.corrupt.is_empty() || repair {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One HTTP/1.0 GET over a std `TcpStream`; returns the status line if the status is 2xx.
///
/// Deliberately tiny (no TLS, no redirects, no runtime): it probes the local listener only.
fn healthcheck(url: &str, timeout: std::time::Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};

    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|err| format!("resolving {authority}: {err}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: regmirror-healthcheck\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line is all we need; HTTP/1.0 makes the server close after the body.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf).map_err(|e| e.to_string())? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_owned();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') && code.len() == 3 => Ok(status_line),
        _ if status_line.is_empty() => Err("no HTTP answer".to_owned()),
        _ => Err(status_line),
    }
}

/// SIGTERM (systemd, Kubernetes, docker stop) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
