//! BuildKit: `[registry."<upstream>"] mirrors` in `/etc/buildkit/buildkitd.toml`.
//!
//! A mirror is named by `host:port` in the upstream's entry; how to reach it (plain HTTP,
//! CA, client key pair) is said in the mirror's own `[registry."host:port"]` entry.

use std::path::PathBuf;

use super::{parse_toml, toml_strings, Client, Error, Finding, Options, Problem};

const BUILDKITD_TOML: &str = "/etc/buildkit/buildkitd.toml";

pub fn check(options: &Options) -> Result<Vec<Finding>, Error> {
    let root = super::Root(options.root.clone());
    let path = options
        .buildkit_config
        .clone()
        .unwrap_or_else(|| root.join(BUILDKITD_TOML));
    let text = match super::read_optional(&path)? {
        Some(text) => text,
        None if options.buildkit_config.is_none() && !root.has_binary(&["buildkitd"]) => {
            return Ok(vec![Finding::absent(
                Client::Buildkit,
                format!("no buildkitd and no {}", path.display()),
            )])
        }
        None => String::new(),
    };
    let table = match parse_toml(Client::Buildkit, &path, &text) {
        Ok(table) => table,
        Err(finding) => return Ok(vec![finding]),
    };
    let file = path.display().to_string();
    let mirror = &options.mirror;
    let authority = &mirror.authority;
    let registries = table.get("registry").and_then(|r| r.as_table());
    let mut findings = Vec::new();
    for upstream in &options.upstreams {
        let mirrors = toml_strings(
            registries
                .and_then(|r| r.get(upstream.as_str()))
                .and_then(|u| u.get("mirrors")),
        );
        let Some(entry) = mirrors.iter().find(|m| mirror.is(m)) else {
            let said = if mirrors.is_empty() {
                "no mirrors".to_owned()
            } else {
                format!("mirrors [{}], not this mirror", mirrors.join(", "))
            };
            findings.push(Finding::bypass(
                Client::Buildkit,
                upstream,
                Problem::BuildkitNoMirror,
                format!("{file}: [registry.\"{upstream}\"] has {said}"),
                format!("add \"{authority}\" to mirrors under [registry.\"{upstream}\"] in {file}"),
            ));
            continue;
        };
        // The mirror's own entry, as named in `mirrors` (BuildKit looks it up by that name).
        let name = entry.split('/').next().unwrap_or(entry);
        let own = registries
            .and_then(|r| r.get(name))
            .and_then(|e| e.as_table());
        let flag = |key: &str| own.and_then(|e| e.get(key)).and_then(|v| v.as_bool()) == Some(true);
        if mirror.is_http() && !flag("http") {
            findings.push(Finding::bypass(
                Client::Buildkit,
                upstream,
                Problem::BuildkitHttpMissing,
                format!(
                    "{file}: the mirror serves plain HTTP and [registry.\"{name}\"] lacks http = true: BuildKit tries HTTPS, fails and pulls {upstream} directly"
                ),
                format!("set http = true under [registry.\"{name}\"] in {file}"),
            ));
            continue;
        }
        let mut files: Vec<String> = toml_strings(own.and_then(|e| e.get("ca")));
        if let Some(toml::Value::Array(pairs)) = own.and_then(|e| e.get("keypair")) {
            for pair in pairs {
                files.extend(toml_strings(pair.get("key")));
                files.extend(toml_strings(pair.get("cert")));
            }
        }
        let missing: Vec<(String, PathBuf)> = files
            .into_iter()
            .map(|f| {
                let resolved = root.join(&f);
                (f, resolved)
            })
            .filter(|(_, resolved)| !resolved.exists())
            .collect();
        if let Some((named, resolved)) = missing.first() {
            findings.push(Finding::bypass(
                Client::Buildkit,
                upstream,
                Problem::BuildkitCertMissing,
                format!(
                    "{file}: [registry.\"{name}\"] names {named}, which does not exist: BuildKit cannot reach the mirror over TLS"
                ),
                format!("put the file at {} or fix the path in {file}", resolved.display()),
            ));
            continue;
        }
        findings.push(Finding::ok(
            Client::Buildkit,
            upstream,
            format!("{file}: [registry.\"{upstream}\"] mirrors has {entry}"),
        ));
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::tests_support::{codes, options_in, write};

    #[test]
    fn buildkitd_toml_verdicts() {
        let http = "[registry.\"docker.io\"]\n  mirrors = [\"mirror.example:5000\"]\n[registry.\"mirror.example:5000\"]\n  http = true\n";
        let tls = "[registry.\"docker.io\"]\n  mirrors = [\"mirror.example:5000\"]\n[registry.\"mirror.example:5000\"]\n  ca = [\"/etc/buildkit/ca.crt\"]\n  [[registry.\"mirror.example:5000\".keypair]]\n    key = \"/etc/buildkit/client.key\"\n    cert = \"/etc/buildkit/client.crt\"\n";
        let cases: &[(&str, &str, &[&str])] = &[
            ("http://mirror.example:5000", http, &["ok"]),
            (
                "http://mirror.example:5000",
                "[registry.\"docker.io\"]\n  mirrors = [\"mirror.example:5000\"]\n",
                &["buildkit-http-missing"],
            ),
            (
                "http://mirror.example:5000",
                "[registry.\"docker.io\"]\n  mirrors = [\"other:5000\"]\n",
                &["buildkit-no-mirror"],
            ),
            (
                "http://mirror.example:5000",
                "debug = true\n",
                &["buildkit-no-mirror"],
            ),
            ("https://mirror.example:5000", tls, &["ok"]),
            (
                "https://mirror.example:5000",
                &tls.replace("client.key", "gone.key"),
                &["buildkit-cert-missing"],
            ),
            (
                "https://mirror.example:5000",
                &tls.replace("ca.crt", "gone.crt"),
                &["buildkit-cert-missing"],
            ),
            ("http://mirror.example:5000", "[registry", &["unparsable"]),
        ];
        for (mirror, text, want) in cases {
            let (dir, mut options) = options_in(&["docker.io"]);
            options.mirror = mirror.parse().unwrap();
            write(dir.path(), BUILDKITD_TOML, text);
            for f in ["ca.crt", "client.key", "client.crt"] {
                write(dir.path(), &format!("/etc/buildkit/{f}"), "");
            }
            assert_eq!(codes(&check(&options).unwrap()), *want, "{mirror} {text}");
        }
        let (_dir, options) = options_in(&["docker.io"]);
        assert_eq!(codes(&check(&options).unwrap()), ["absent"]);
    }
}
