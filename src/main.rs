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

/// SIGTERM (systemd, Kubernetes, docker stop) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
