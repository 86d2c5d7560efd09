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
    /// Exit 0 if a GET of the mirror's /healthz answers 2xx: the container HEALTHCHECK, since a
    /// scratch image has no curl. With --config the URL is where that configuration listens
    /// (`listen`, https with `tls`).
    Healthcheck {
        /// The configuration the server runs with; the probe goes where it listens.
        #[arg(long, short, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// An explicit http:// or https:// URL (default: http://127.0.0.1:5000/healthz).
        #[arg(long)]
        url: Option<String>,
        /// Seconds allowed for connecting and for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
        /// PEM client certificate, for a listener with `tls.client_ca`.
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// PEM key of --client-cert.
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
    },
    /// Pre-warm a running mirror: pull every platform of each image through it, as a client
    /// would, so that later pulls are cache hits. Exits 1 naming each reference that failed.
    Warm {
        /// Image references: alpine:3.20, docker.io/library/alpine:3.20, ghcr.io/org/app:1.4,
        /// quay.io/org/app@sha256:… (a registry host becomes the mirror's `?ns=`).
        references: Vec<String>,
        /// A file of references, one per line (`#` comments and blank lines are skipped).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// The mirror's base URL.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        mirror: String,
        /// Only this platform of multi-platform images (os/arch[/variant]); default all.
        #[arg(long)]
        platform: Option<regmirror::warm::Platform>,
        /// Blob downloads (and images) in flight at once.
        #[arg(long, short, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
        jobs: u16,
        /// The mirror's htpasswd user; the password comes from --password-file or the
        /// REGMIRROR_PASSWORD environment variable, never from the command line.
        #[arg(long)]
        username: Option<String>,
        /// A file holding the password of --username.
        #[arg(long, requires = "username")]
        password_file: Option<PathBuf>,
        /// PEM CA certificates to trust for an https:// mirror (besides the system roots).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// PEM client certificate, for a mirror with `tls.client_ca`.
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// PEM key of --client-cert.
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
    },
    /// Check that this node's container clients pull through the mirror: reads Docker's
    /// daemon.json, containerd's config.toml and hosts.toml files, buildkitd.toml and
    /// registries.conf, and prints per client and upstream OK, WARN, BYPASS (with the exact
    /// fix) or ABSENT. With --probe it also pulls IMAGE with each client found (docker,
    /// ctr, podman) and asks the mirror which pulls it saw. Exit status: 0 when every
    /// configured client goes through the mirror, 1 when one bypasses it, 2 on usage or
    /// read errors.
    Doctor {
        /// The mirror the clients should use: http://HOST:PORT or https://HOST:PORT.
        #[arg(long)]
        mirror: String,
        /// Read every file under this directory instead of / (a node's image or a copy of
        /// its /etc).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// An upstream to check each client for (repeat it).
        #[arg(long = "upstream", default_value = "docker.io")]
        upstreams: Vec<String>,
        /// Docker's daemon.json instead of ROOT/etc/docker/daemon.json.
        #[arg(long)]
        docker_config: Option<PathBuf>,
        /// containerd's config instead of ROOT/etc/containerd/config.toml.
        #[arg(long)]
        containerd_config: Option<PathBuf>,
        /// buildkitd.toml instead of ROOT/etc/buildkit/buildkitd.toml.
        #[arg(long)]
        buildkit_config: Option<PathBuf>,
        /// registries.conf instead of ROOT/etc/containers/registries.conf and its drop-ins.
        #[arg(long)]
        registries_conf: Option<PathBuf>,
        /// Live check: pull this image with each client found (e.g.
        /// docker.io/library/alpine:3.20) and ask the mirror which pulls it saw.
        #[arg(long, value_name = "IMAGE")]
        probe: Option<String>,
        /// Seconds each probe pull may take.
        #[arg(long, default_value_t = 120)]
        probe_timeout: u64,
        /// The docker daemon the probe pulls with.
        #[arg(long, default_value = "unix:///var/run/docker.sock")]
        docker_host: String,
        /// containerd's socket the probe pulls with (`ctr -a`).
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd_address: PathBuf,
        /// An argument for podman before `pull` (repeat it), e.g. --podman-arg=--root=DIR.
        #[arg(long = "podman-arg", allow_hyphen_values = true)]
        podman_args: Vec<String>,
        /// PEM CA certificates to trust for an https:// mirror.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
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
        Command::Doctor {
            mirror,
            root,
            upstreams,
            docker_config,
            containerd_config,
            buildkit_config,
            registries_conf,
            probe,
            probe_timeout,
            docker_host,
            containerd_address,
            podman_args,
            ca,
            json,
        } => {
            let mirror = match mirror.parse() {
                Ok(mirror) => mirror,
                Err(err) => {
                    eprintln!("regmirror doctor: {err}");
                    return ExitCode::from(2);
                }
            };
            let probe = probe.map(|image| regmirror::doctor::probe::ProbeOptions {
                image: regmirror::doctor::probe::qualify(&image),
                timeout: std::time::Duration::from_secs(probe_timeout),
                docker_host,
                containerd_address,
                podman_args,
                ca,
            });
            let options = regmirror::doctor::Options {
                mirror,
                root,
                upstreams,
                docker_config,
                containerd_config,
                buildkit_config,
                registries_conf,
                probe,
                json,
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let mut out = std::io::stdout();
            match runtime.block_on(regmirror::doctor::run(options, &mut out)) {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("regmirror doctor: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Healthcheck {
            config,
            url,
            timeout,
            client_cert,
            client_key,
        } => {
            let mut probe = match (config, url) {
                (Some(path), _) => match Config::load(&path) {
                    Ok(config) => regmirror::healthcheck::Probe::from_config(&config),
                    Err(err) => {
                        eprintln!("{err}");
                        return ExitCode::from(2);
                    }
                },
                (None, url) => regmirror::healthcheck::Probe {
                    url: url.unwrap_or_else(|| "http://127.0.0.1:5000/healthz".to_owned()),
                    client_identity: None,
                },
            };
            probe.client_identity = client_cert.zip(client_key);
            let timeout = std::time::Duration::from_secs(timeout);
            match regmirror::healthcheck::check(&probe, timeout) {
                Ok(status) => {
                    println!("{}: {status}", probe.url);
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("{}: {err}", probe.url);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Warm {
            mut references,
            file,
            mirror,
            platform,
            jobs,
            username,
            password_file,
            ca,
            client_cert,
            client_key,
        } => {
            if let Some(file) = file {
                match std::fs::read_to_string(&file) {
                    Ok(text) => references.extend(regmirror::warm::read_list(&text)),
                    Err(err) => {
                        eprintln!("--file {}: {err}", file.display());
                        return ExitCode::from(2);
                    }
                }
            }
            if references.is_empty() {
                eprintln!("regmirror warm: no image references (give some, or --file)");
                return ExitCode::from(2);
            }
            let basic_auth = match username {
                None => None,
                Some(user) => match password(password_file.as_ref()) {
                    Ok(password) => Some((user, password)),
                    Err(err) => {
                        eprintln!("regmirror warm: {err}");
                        return ExitCode::from(2);
                    }
                },
            };
            let options = regmirror::warm::Options {
                mirror,
                references,
                platform,
                jobs: usize::from(jobs),
                basic_auth,
                ca,
                client_identity: client_cert.zip(client_key),
                progress: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(regmirror::warm::run(options, Box::new(std::io::stdout()))) {
                Ok(summary) if summary.failed.is_empty() => ExitCode::SUCCESS,
                Ok(summary) => {
                    for (reference, _) in &summary.failed {
                        eprintln!("regmirror warm: failed: {reference}");
                    }
                    ExitCode::FAILURE
                }
                Err(err) => {
                    eprintln!("regmirror warm: {err}");
                    ExitCode::from(2)
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
                    relinked: found.relinked,
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

/// The mirror password for `warm`: from a file, else from `REGMIRROR_PASSWORD` (never
/// from the command line, where `ps` shows it).
fn password(file: Option<&PathBuf>) -> Result<String, String> {
    match file {
        Some(file) => std::fs::read_to_string(file)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|err| format!("--password-file {}: {err}", file.display())),
        None => std::env::var("REGMIRROR_PASSWORD")
            .map_err(|_| "--username needs --password-file or REGMIRROR_PASSWORD".to_owned()),
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
