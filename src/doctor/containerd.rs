//! containerd: `config_path` in `/etc/containerd/config.toml` and the `hosts.toml` files it
//! points at.
//!
//! containerd reads `<config_path>/<upstream>/hosts.toml` (else `_default/hosts.toml`) only
//! when a `config_path` is set: CRI's in a version 2 configuration (containerd 1.x), and in
//! a version 3 one (2.x) CRI's and, separately, the transfer service's, which is not
//! inherited from CRI (containerd #12415, #12636). Remote snapshotters (SOCI, older stargz)
//! fetch layers with their own resolver and never read hosts.toml.

use std::path::{Path, PathBuf};

use super::{parse_toml, toml_at, toml_strings, Client, Error, Finding, Options, Problem, Verdict};

const CONFIG: &str = "/etc/containerd/config.toml";
const CERTS_D: &str = "/etc/containerd/certs.d";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.images";
const TRANSFER: &str = "io.containerd.transfer.v1.local";

/// What config.toml says about registries.
struct Config {
    path: PathBuf,
    version: i64,
    /// CRI's `registry.config_path`, as written.
    cri: Option<String>,
    /// The transfer service's `config_path` (version 3 only).
    transfer: Option<String>,
    /// Proxy plugins that are remote snapshotters.
    remote_snapshotters: Vec<String>,
}

impl Config {
    /// The table a fix for CRI's `config_path` goes under.
    fn cri_table(&self) -> String {
        if self.version >= 3 {
            format!("[plugins.\"{CRI_V3}\".registry]")
        } else {
            format!("[plugins.\"{CRI_V2}\".registry]")
        }
    }
}

/// Reads config.toml: `Ok(Err(finding))` when the client is absent or the file is broken.
fn load(options: &Options) -> Result<Result<Config, Finding>, Error> {
    let root = super::Root(options.root.clone());
    let path = options
        .containerd_config
        .clone()
        .unwrap_or_else(|| root.join(CONFIG));
    let text = match super::read_optional(&path)? {
        Some(text) => text,
        None if options.containerd_config.is_none() && !root.has_binary(&["containerd"]) => {
            return Ok(Err(Finding::absent(
                Client::Containerd,
                format!("no containerd and no {}", path.display()),
            )))
        }
        // containerd's built-in defaults set no config_path.
        None => String::new(),
    };
    let table = match parse_toml(Client::Containerd, &path, &text) {
        Ok(table) => table,
        Err(finding) => return Ok(Err(finding)),
    };
    // A file without `version` is read as version 1 by containerd 1.x, whose CRI plugin is
    // `plugins.cri`; 2.x migrates it. Either way CRI's key is looked up under both names.
    let version = table
        .get("version")
        .and_then(toml::Value::as_integer)
        .unwrap_or(1);
    let cri_plugin = if version >= 3 { CRI_V3 } else { CRI_V2 };
    let cri = toml_at(&table, &["plugins", cri_plugin, "registry", "config_path"])
        .or_else(|| toml_at(&table, &["plugins", "cri", "registry", "config_path"]))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let transfer = toml_at(&table, &["plugins", TRANSFER, "config_path"])
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let remote_snapshotters = table
        .get("proxy_plugins")
        .and_then(|v| v.as_table())
        .map(|plugins| {
            plugins
                .iter()
                .filter(|(name, plugin)| {
                    let name = name.to_ascii_lowercase();
                    let address = plugin
                        .get("address")
                        .and_then(|a| a.as_str())
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    ["soci", "stargz"]
                        .iter()
                        .any(|s| name.contains(s) || address.contains(s))
                })
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(Ok(Config {
        path,
        version,
        cri,
        transfer,
        remote_snapshotters,
    }))
}

pub fn check(options: &Options) -> Result<Vec<Finding>, Error> {
    let config = match load(options)? {
        Ok(config) => config,
        Err(finding) => return Ok(vec![finding]),
    };
    let root = super::Root(options.root.clone());
    let file = config.path.display().to_string();
    let mut findings = Vec::new();
    for name in &config.remote_snapshotters {
        findings.push(Finding::problem(
            Client::Containerd,
            None,
            Verdict::Warn,
            Problem::ContainerdSnapshotterIgnoresHosts,
            format!(
                "{file}: proxy plugin {name:?} is a remote snapshotter; it fetches layers with its own resolver and ignores hosts.toml"
            ),
            Some(format!(
                "configure the mirror in {name}'s own configuration (its registry mirrors), or pull with the default snapshotter"
            )),
        ));
    }
    if config.version >= 3 {
        let want = config.cri.clone().unwrap_or_else(|| CERTS_D.to_owned());
        match &config.transfer {
            None => findings.push(Finding::problem(
                Client::Containerd,
                None,
                Verdict::Bypass,
                Problem::ContainerdTransferNoConfigPath,
                format!(
                    "{file}: the transfer service (ctr, nerdctl, dockerd's containerd store) has no config_path: its pulls skip every hosts.toml (containerd #12415)"
                ),
                Some(format!(
                    "set config_path = \"{want}\" under [plugins.\"{TRANSFER}\"] in {file}"
                )),
            )),
            Some(transfer) if config.cri.as_ref().is_some_and(|cri| cri != transfer) => {
                findings.push(Finding::problem(
                    Client::Containerd,
                    None,
                    Verdict::Bypass,
                    Problem::ContainerdTransferConfigPathDiffers,
                    format!(
                        "{file}: the transfer service reads config_path \"{transfer}\", CRI reads \"{want}\": one of them misses the mirror (containerd #12636)"
                    ),
                    Some(format!(
                        "set config_path = \"{want}\" under [plugins.\"{TRANSFER}\"] in {file}"
                    )),
                ))
            }
            Some(_) => {}
        }
    }
    // The hosts directory CRI reads; with none, the transfer service's (what ctr reads).
    let Some(config_path) = config.cri.clone() else {
        for upstream in &options.upstreams {
            findings.push(Finding::bypass(
                Client::Containerd,
                upstream,
                Problem::ContainerdNoConfigPath,
                format!("{file} sets no CRI registry config_path: no hosts.toml is read, {upstream} is pulled directly"),
                format!(
                    "set config_path = \"{CERTS_D}\" under {} in {file}, then restart containerd",
                    config.cri_table()
                ),
            ));
        }
        if let Some(transfer) = &config.transfer {
            for upstream in &options.upstreams {
                findings.push(check_hosts(options, &root, transfer, upstream));
            }
        }
        return Ok(findings);
    };
    for upstream in &options.upstreams {
        findings.push(check_hosts(options, &root, &config_path, upstream));
    }
    Ok(findings)
}

/// The hosts directory a probe pull uses (`ctr images pull --hosts-dir`): CRI's
/// `config_path`, else the transfer service's, resolved under the root.
pub fn hosts_dir(options: &Options) -> Result<Option<PathBuf>, Error> {
    let Ok(config) = load(options)? else {
        return Ok(None);
    };
    let root = super::Root(options.root.clone());
    Ok(config
        .cri
        .or(config.transfer)
        .and_then(|paths| paths.split(':').next().map(|p| root.join(p))))
}

/// What `<config_path>/<upstream>/hosts.toml` says about the mirror.
fn check_hosts(
    options: &Options,
    root: &super::Root,
    config_path: &str,
    upstream: &str,
) -> Finding {
    let mirror = &options.mirror;
    let url = mirror.url();
    let dirs: Vec<&str> = config_path.split(':').filter(|d| !d.is_empty()).collect();
    let found = ["", "_default"].iter().find_map(|fallback| {
        dirs.iter().find_map(|dir| {
            let name = if fallback.is_empty() {
                upstream
            } else {
                fallback
            };
            let path = root.join(dir).join(name).join("hosts.toml");
            std::fs::read_to_string(&path).ok().map(|text| (path, text))
        })
    });
    let first_dir = dirs.first().copied().unwrap_or(CERTS_D);
    let Some((path, text)) = found else {
        let server = if upstream == "docker.io" {
            "https://registry-1.docker.io".to_owned()
        } else {
            format!("https://{upstream}")
        };
        return Finding::bypass(
            Client::Containerd,
            upstream,
            Problem::ContainerdNoHostsToml,
            format!("no {first_dir}/{upstream}/hosts.toml (config_path = \"{config_path}\"): {upstream} is pulled directly"),
            format!(
                "create {first_dir}/{upstream}/hosts.toml with: server = \"{server}\" [host.\"{url}\"] capabilities = [\"pull\", \"resolve\"]"
            ),
        );
    };
    let file = path.display().to_string();
    let table = match parse_toml(Client::Containerd, &path, &text) {
        Ok(table) => table,
        Err(mut finding) => {
            finding.upstream = Some(upstream.to_owned());
            return finding;
        }
    };
    let hosts = table.get("host").and_then(|h| h.as_table());
    let ours = hosts.and_then(|hosts| hosts.iter().find(|(name, _)| mirror.is(name)));
    let Some((host, entry)) = ours else {
        let names: Vec<&str> = hosts
            .map(|h| h.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let server = table.get("server").and_then(|s| s.as_str()).unwrap_or("-");
        return Finding::bypass(
            Client::Containerd,
            upstream,
            Problem::ContainerdHostNotMirror,
            format!(
                "{file}: no [host] is the mirror (hosts: [{}], server: {server})",
                names.join(", ")
            ),
            format!("add to {file}: [host.\"{url}\"] capabilities = [\"pull\", \"resolve\"]"),
        );
    };
    let (scheme, _, host_path) = super::parse_authority(host, &mirror.scheme).unwrap_or_default();
    if scheme != mirror.scheme {
        return Finding::bypass(
            Client::Containerd,
            upstream,
            Problem::ContainerdSchemeMismatch,
            format!(
                "{file}: [host.\"{host}\"] speaks {scheme}, the mirror serves {}",
                mirror.scheme
            ),
            format!("in {file}, rename [host.\"{host}\"] to [host.\"{url}{host_path}\"]"),
        );
    }
    if let Some(capabilities) = entry.get("capabilities") {
        let capabilities = toml_strings(Some(capabilities));
        let missing: Vec<&str> = ["pull", "resolve"]
            .into_iter()
            .filter(|c| !capabilities.iter().any(|have| have == c))
            .collect();
        if !missing.is_empty() {
            return Finding::bypass(
                Client::Containerd,
                upstream,
                Problem::ContainerdCapabilities,
                format!(
                    "{file}: [host.\"{host}\"] lacks capability {}: {} goes to {upstream} itself",
                    missing.join(", "),
                    if missing.contains(&"resolve") {
                        "resolving tags"
                    } else {
                        "pulling content"
                    }
                ),
                format!(
                    "set capabilities = [\"pull\", \"resolve\"] under [host.\"{host}\"] in {file}"
                ),
            );
        }
    }
    let override_path = entry
        .get("override_path")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if !host_path.trim_end_matches('/').is_empty() && !override_path {
        return Finding::bypass(
            Client::Containerd,
            upstream,
            Problem::ContainerdPathWithoutOverride,
            format!(
                "{file}: [host.\"{host}\"] has a path, and without override_path containerd appends /v2 to it: the mirror answers 404 and containerd falls back to {upstream}"
            ),
            format!(
                "set override_path = true under [host.\"{host}\"] in {file} (the path must then end in /v2)"
            ),
        );
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut files = toml_strings(entry.get("ca"));
    files.extend(toml_strings(entry.get("client")));
    if let Some(toml::Value::Array(pairs)) = entry.get("client") {
        for pair in pairs {
            files.extend(toml_strings(Some(pair)));
        }
    }
    for named in files {
        // containerd reads a relative path against the hosts.toml's directory.
        let resolved = if named.starts_with('/') {
            root.join(&named)
        } else {
            dir.join(&named)
        };
        if !resolved.exists() {
            return Finding::bypass(
                Client::Containerd,
                upstream,
                Problem::ContainerdCaMissing,
                format!(
                    "{file}: [host.\"{host}\"] names {named}, which does not exist: containerd cannot set up the mirror's TLS and the pull fails or falls back"
                ),
                format!("put the certificate at {} or fix the path in {file}", resolved.display()),
            );
        }
    }
    Finding::ok(
        Client::Containerd,
        upstream,
        format!("{file}: [host.\"{host}\"] pulls and resolves through the mirror"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::tests_support::{codes, options_in, write};

    const GOOD_HOSTS: &str = "server = \"https://registry-1.docker.io\"\n[host.\"http://mirror.example:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
    const V2: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    const V3: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = \"/etc/containerd/certs.d\"\n";

    #[test]
    fn config_and_hosts_verdicts() {
        let hosts = "/etc/containerd/certs.d/docker.io/hosts.toml";
        let cases: &[(&str, Option<&str>, &[&str])] = &[
            (V2, Some(GOOD_HOSTS), &["ok"]),
            (V3, Some(GOOD_HOSTS), &["ok"]),
            ("version = 2\n", Some(GOOD_HOSTS), &["containerd-no-config-path"]),
            ("", None, &["containerd-no-config-path"]),
            (
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
                Some(GOOD_HOSTS),
                &["containerd-transfer-no-config-path", "ok"],
            ),
            (
                &V3.replace("config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = \"/etc/containerd/certs.d\"", "config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = \"/etc/other\""),
                Some(GOOD_HOSTS),
                &["containerd-transfer-config-path-differs", "ok"],
            ),
            (V2, None, &["containerd-no-hosts-toml"]),
            (V2, Some("server = \"https://registry-1.docker.io\"\n"), &["containerd-host-not-mirror"]),
            (
                V2,
                Some("[host.\"https://other.example:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
                &["containerd-host-not-mirror"],
            ),
            (
                V2,
                Some("[host.\"https://mirror.example:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
                &["containerd-scheme-mismatch"],
            ),
            (V2, Some(&GOOD_HOSTS.replace("\"pull\", \"resolve\"", "\"pull\"")), &["containerd-capabilities"]),
            // No capabilities at all means every capability.
            (V2, Some("[host.\"http://mirror.example:5000\"]\n"), &["ok"]),
            (
                V2,
                Some("[host.\"http://mirror.example:5000/v2/docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
                &["containerd-path-without-override"],
            ),
            (
                V2,
                Some("[host.\"http://mirror.example:5000/v2/docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"),
                &["ok"],
            ),
            (V2, Some(&format!("{GOOD_HOSTS}  ca = \"/etc/containerd/certs.d/docker.io/ca.crt\"\n")), &["containerd-ca-missing"]),
            (V2, Some(&format!("{GOOD_HOSTS}  ca = \"present.crt\"\n")), &["ok"]),
            (V2, Some("[host"), &["unparsable"]),
            (
                &format!("{V2}[proxy_plugins.soci]\n  type = \"snapshot\"\n  address = \"/run/soci/soci.sock\"\n"),
                Some(GOOD_HOSTS),
                &["containerd-snapshotter-ignores-hosts", "ok"],
            ),
        ];
        for (config, hosts_toml, want) in cases {
            let (dir, options) = options_in(&["docker.io"]);
            write(dir.path(), CONFIG, config);
            write(
                dir.path(),
                "/etc/containerd/certs.d/docker.io/present.crt",
                "",
            );
            if let Some(text) = hosts_toml {
                write(dir.path(), hosts, text);
            }
            assert_eq!(
                codes(&check(&options).unwrap()),
                *want,
                "{config}\n---\n{hosts_toml:?}"
            );
        }
    }

    #[test]
    fn default_hosts_and_absent() {
        let (dir, options) = options_in(&["ghcr.io"]);
        assert_eq!(codes(&check(&options).unwrap()), ["absent"]);
        write(dir.path(), CONFIG, V2);
        write(
            dir.path(),
            "/etc/containerd/certs.d/_default/hosts.toml",
            GOOD_HOSTS,
        );
        assert_eq!(codes(&check(&options).unwrap()), ["ok"]);
        assert_eq!(
            hosts_dir(&options).unwrap(),
            Some(dir.path().join("etc/containerd/certs.d"))
        );
    }
}
