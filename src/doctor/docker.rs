//! Docker Engine: `registry-mirrors` in `/etc/docker/daemon.json`.
//!
//! The daemon asks its mirrors for Docker Hub images only, with the classic image store and
//! with the containerd image store alike (moby #52890): other upstreams are pulled from the
//! registry itself unless the image is named through the mirror. A mirror given as
//! `http://…` is dialled over plain HTTP as written, so it needs no `insecure-registries`.

use super::{Client, Error, Finding, Options, Problem, Verdict};

const DAEMON_JSON: &str = "/etc/docker/daemon.json";

pub fn check(options: &Options) -> Result<Vec<Finding>, Error> {
    let root = super::Root(options.root.clone());
    let path = options
        .docker_config
        .clone()
        .unwrap_or_else(|| root.join(DAEMON_JSON));
    let text = match super::read_optional(&path)? {
        Some(text) => text,
        None if options.docker_config.is_none() && !root.has_binary(&["dockerd"]) => {
            return Ok(vec![Finding::absent(
                Client::Docker,
                format!("no dockerd and no {}", path.display()),
            )])
        }
        // Installed without a daemon.json: the daemon's defaults have no mirror.
        None => String::from("{}"),
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(json) => json,
        Err(err) => {
            return Ok(vec![Finding::problem(
                Client::Docker,
                None,
                Verdict::Bypass,
                Problem::Unparsable,
                format!("{} is not valid JSON: {err}", path.display()),
                Some(format!("fix the syntax of {}", path.display())),
            )])
        }
    };
    let mirrors: Vec<String> = json
        .get("registry-mirrors")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let url = options.mirror.url();
    let ours = mirrors.iter().find(|m| options.mirror.is(m));
    let file = path.display();
    let mut findings = Vec::new();
    for upstream in &options.upstreams {
        if upstream != "docker.io" {
            findings.push(Finding::problem(
                Client::Docker,
                Some(upstream),
                Verdict::Warn,
                Problem::DockerHubOnly,
                format!(
                    "registry-mirrors covers Docker Hub only: `docker pull {upstream}/…` goes to {upstream} itself (moby #52890)"
                ),
                Some(format!(
                    "pull it by the mirror's name: docker pull {}/{upstream}/<repository>:<tag>",
                    options.mirror.authority
                )),
            ));
            continue;
        }
        let finding = match ours {
            Some(entry) => Finding::ok(
                Client::Docker,
                upstream,
                format!("{file}: registry-mirrors has {entry}"),
            ),
            None if mirrors.is_empty() => Finding::bypass(
                Client::Docker,
                upstream,
                Problem::DockerNoMirror,
                format!("{file} has no registry-mirrors: Docker Hub is pulled directly"),
                format!("add \"{url}\" to \"registry-mirrors\" in {file}, then restart dockerd"),
            ),
            None => Finding::bypass(
                Client::Docker,
                upstream,
                Problem::DockerOtherMirror,
                format!(
                    "{file}: registry-mirrors is [{}], not this mirror",
                    mirrors.join(", ")
                ),
                format!("add \"{url}\" to \"registry-mirrors\" in {file}, then restart dockerd"),
            ),
        };
        findings.push(finding);
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::tests_support::{codes, options_in};

    #[test]
    fn daemon_json_verdicts() {
        let cases: &[(Option<&str>, bool, &[&str])] = &[
            (
                Some(r#"{"registry-mirrors": ["http://mirror.example:5000"]}"#),
                false,
                &["ok"],
            ),
            (
                Some(r#"{"registry-mirrors": ["http://mirror.example:5000/"]}"#),
                false,
                &["ok"],
            ),
            (
                Some(r#"{"registry-mirrors": ["https://other.example"]}"#),
                false,
                &["docker-other-mirror"],
            ),
            (Some(r#"{"debug": true}"#), false, &["docker-no-mirror"]),
            (Some("{"), false, &["unparsable"]),
            // Installed without daemon.json: no mirror.
            (None, true, &["docker-no-mirror"]),
            (None, false, &["absent"]),
        ];
        for (daemon_json, installed, want) in cases {
            let (dir, options) = options_in(&["docker.io"]);
            if let Some(text) = daemon_json {
                std::fs::create_dir_all(dir.path().join("etc/docker")).unwrap();
                std::fs::write(dir.path().join("etc/docker/daemon.json"), text).unwrap();
            }
            if *installed {
                std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
                std::fs::write(dir.path().join("usr/bin/dockerd"), "").unwrap();
            }
            assert_eq!(codes(&check(&options).unwrap()), *want, "{daemon_json:?}");
        }
    }

    #[test]
    fn other_upstreams_are_a_warning() {
        let (dir, options) = options_in(&["docker.io", "ghcr.io"]);
        std::fs::create_dir_all(dir.path().join("etc/docker")).unwrap();
        std::fs::write(
            dir.path().join("etc/docker/daemon.json"),
            r#"{"registry-mirrors": ["http://mirror.example:5000"]}"#,
        )
        .unwrap();
        let findings = check(&options).unwrap();
        assert_eq!(codes(&findings), ["ok", "docker-hub-only"]);
        assert_eq!(findings[1].verdict, Verdict::Warn);
    }
}
