//! containers/image (podman, buildah, skopeo, CRI-O): `[[registry.mirror]]` in
//! `/etc/containers/registries.conf` and `registries.conf.d/*.conf`.
//!
//! A mirror is a location without a query string, so regmirror learns the upstream from a
//! path prefix: `mirror:5000/ghcr.io`. An upstream whose name has a port cannot be such a
//! prefix (`:` is not allowed in a repository path segment). Drop-ins are read in name
//! order, and a `[[registry]]` with the same prefix replaces the earlier one.

use std::path::{Path, PathBuf};

use super::{parse_toml, Client, Error, Finding, Options, Problem, Verdict};

const REGISTRIES_CONF: &str = "/etc/containers/registries.conf";
const REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

/// One `[[registry]]` entry, as far as mirroring goes.
#[derive(Debug, Clone)]
struct Registry {
    prefix: String,
    mirrors: Vec<(String, bool)>,
    file: PathBuf,
}

/// The files containers/image reads, in order: the main file, then the drop-ins by name.
fn files(options: &Options) -> Result<Vec<PathBuf>, Error> {
    if let Some(file) = &options.registries_conf {
        return Ok(vec![file.clone()]);
    }
    let root = super::Root(options.root.clone());
    let mut files = vec![root.join(REGISTRIES_CONF)];
    let dir = root.join(REGISTRIES_CONF_D);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut drop_ins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect();
            drop_ins.sort();
            files.extend(drop_ins);
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Read { path: dir, source }),
    }
    Ok(files)
}

/// The main registries.conf, for a probe pull (`CONTAINERS_REGISTRIES_CONF`), when doctor
/// reads another file than the system's.
pub fn registries_conf_for_probe(options: &Options) -> Option<PathBuf> {
    match &options.registries_conf {
        Some(file) => Some(file.clone()),
        None if options.root != Path::new("/") => {
            Some(super::Root(options.root.clone()).join(REGISTRIES_CONF))
        }
        None => None,
    }
}

pub fn check(options: &Options) -> Result<Vec<Finding>, Error> {
    let root = super::Root(options.root.clone());
    let mut registries: Vec<Registry> = Vec::new();
    let mut read_any = false;
    for path in files(options)? {
        let Some(text) = super::read_optional(&path)? else {
            continue;
        };
        read_any = true;
        let table = match parse_toml(Client::Containers, &path, &text) {
            Ok(table) => table,
            Err(finding) => return Ok(vec![finding]),
        };
        let entries = table
            .get("registry")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        for entry in entries {
            let location = entry.get("location").and_then(|v| v.as_str());
            let Some(prefix) = entry
                .get("prefix")
                .and_then(|v| v.as_str())
                .or(location)
                .map(str::to_owned)
            else {
                continue;
            };
            let mirrors = entry
                .get("mirror")
                .and_then(|m| m.as_array())
                .map(|mirrors| {
                    mirrors
                        .iter()
                        .filter_map(|m| {
                            let location = m.get("location")?.as_str()?.to_owned();
                            let insecure =
                                m.get("insecure").and_then(|i| i.as_bool()) == Some(true);
                            Some((location, insecure))
                        })
                        .collect()
                })
                .unwrap_or_default();
            registries.retain(|r| r.prefix != prefix);
            registries.push(Registry {
                prefix,
                mirrors,
                file: path.clone(),
            });
        }
    }
    let tools = ["podman", "buildah", "skopeo", "crio"];
    if !read_any && (options.registries_conf.is_some() || !root.has_binary(&tools)) {
        return Ok(vec![Finding::absent(
            Client::Containers,
            format!(
                "no podman, buildah, skopeo or CRI-O and no {}",
                root.join(REGISTRIES_CONF).display()
            ),
        )]);
    }
    let main = options
        .registries_conf
        .clone()
        .unwrap_or_else(|| root.join(REGISTRIES_CONF));
    Ok(options
        .upstreams
        .iter()
        .map(|upstream| verdict(options, &registries, &main, upstream))
        .collect())
}

fn verdict(options: &Options, registries: &[Registry], main: &Path, upstream: &str) -> Finding {
    let mirror = &options.mirror;
    let authority = &mirror.authority;
    let want = format!("{authority}/{upstream}");
    let insecure_line = if mirror.is_http() {
        " insecure = true"
    } else {
        ""
    };
    let block = format!(
        "[[registry]] prefix = \"{upstream}\" location = \"{upstream}\" [[registry.mirror]] location = \"{want}\"{insecure_line}"
    );
    if upstream.contains(':') {
        return Finding::bypass(
            Client::Containers,
            upstream,
            Problem::ContainersPortInPrefix,
            format!(
                "podman cannot mirror an upstream whose name has a port in a path prefix: \"{want}\" is not a valid location (`:` in a repository path)"
            ),
            format!(
                "name the upstream without its port in regmirror's config.yml (e.g. {}: {{ url: \"https://{upstream}\" }}) and mirror that name",
                upstream.split(':').next().unwrap_or(upstream)
            ),
        );
    }
    // The longest prefix that covers the upstream's images, as containers/image matches.
    let entry = registries
        .iter()
        .filter(|r| r.prefix == upstream || upstream.starts_with(&format!("{}/", r.prefix)))
        .max_by_key(|r| r.prefix.len());
    let Some(entry) = entry.filter(|e| !e.mirrors.is_empty()) else {
        return Finding::bypass(
            Client::Containers,
            upstream,
            Problem::ContainersNoMirror,
            format!("no [[registry.mirror]] for {upstream}: it is pulled directly"),
            format!("add to {}: {block}", main.display()),
        );
    };
    let file = entry.file.display();
    let Some((location, insecure)) = entry.mirrors.iter().find(|(l, _)| mirror.is(l)) else {
        let locations: Vec<&str> = entry.mirrors.iter().map(|(l, _)| l.as_str()).collect();
        return Finding::bypass(
            Client::Containers,
            upstream,
            Problem::ContainersOtherMirror,
            format!(
                "{file}: the mirrors of \"{}\" are [{}], not this mirror",
                entry.prefix,
                locations.join(", ")
            ),
            format!("add to [[registry]] prefix = \"{}\" in {file}: [[registry.mirror]] location = \"{want}\"{insecure_line}", entry.prefix),
        );
    };
    let path = location
        .split_once('/')
        .map_or("", |(_, path)| path)
        .trim_matches('/');
    if path != upstream {
        // Without a prefix regmirror sends the request to its default upstream: right for
        // docker.io when that is the default, wrong content (404, fall back) otherwise.
        let (verdict, why) = if path.is_empty() && upstream == "docker.io" {
            (
                Verdict::Warn,
                "works only while docker.io is the mirror's default upstream",
            )
        } else {
            (Verdict::Bypass, "the mirror sends these requests to another upstream, answers 404 and podman falls back")
        };
        return Finding::problem(
            Client::Containers,
            Some(upstream),
            verdict,
            Problem::ContainersPrefix,
            format!(
                "{file}: mirror location \"{location}\" lacks the path prefix /{upstream}: {why}"
            ),
            Some(format!(
                "set location = \"{want}\" in that [[registry.mirror]] of {file}"
            )),
        );
    }
    if mirror.is_http() && !insecure {
        return Finding::bypass(
            Client::Containers,
            upstream,
            Problem::ContainersInsecureMissing,
            format!(
                "{file}: mirror \"{location}\" serves plain HTTP and lacks insecure = true: podman tries HTTPS, fails and pulls {upstream} directly"
            ),
            format!("set insecure = true in the [[registry.mirror]] location = \"{location}\" of {file}"),
        );
    }
    Finding::ok(
        Client::Containers,
        upstream,
        format!("{file}: [[registry.mirror]] location = \"{location}\""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::tests_support::{codes, options_in, write};

    const GOOD: &str = "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"mirror.example:5000/docker.io\"\ninsecure = true\n";

    #[test]
    fn registries_conf_verdicts() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("docker.io", GOOD, &["ok"]),
            (
                "docker.io",
                &GOOD.replace("insecure = true\n", ""),
                &["containers-insecure-missing"],
            ),
            (
                "docker.io",
                &GOOD.replace("mirror.example:5000/docker.io", "mirror.example:5000"),
                &["containers-prefix"],
            ),
            (
                "docker.io",
                &GOOD.replace(
                    "mirror.example:5000/docker.io",
                    "mirror.example:5000/quay.io",
                ),
                &["containers-prefix"],
            ),
            (
                "docker.io",
                &GOOD.replace("mirror.example", "other.example"),
                &["containers-other-mirror"],
            ),
            (
                "docker.io",
                "unqualified-search-registries = [\"docker.io\"]\n",
                &["containers-no-mirror"],
            ),
            (
                "docker.io",
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n",
                &["containers-no-mirror"],
            ),
            ("ghcr.io", GOOD, &["containers-no-mirror"]),
            ("registry.local:5000", GOOD, &["containers-port-in-prefix"]),
            ("docker.io", "[[registry]", &["unparsable"]),
        ];
        for (upstream, text, want) in cases {
            let (dir, options) = options_in(&[upstream]);
            write(dir.path(), REGISTRIES_CONF, text);
            assert_eq!(codes(&check(&options).unwrap()), *want, "{upstream} {text}");
        }
        let findings = {
            let (dir, options) = options_in(&["docker.io"]);
            write(
                dir.path(),
                REGISTRIES_CONF,
                &GOOD.replace("mirror.example:5000/docker.io", "mirror.example:5000"),
            );
            check(&options).unwrap()
        };
        assert_eq!(findings[0].verdict, Verdict::Warn);
    }

    #[test]
    fn drop_ins_replace_by_prefix() {
        let (dir, options) = options_in(&["docker.io"]);
        write(
            dir.path(),
            REGISTRIES_CONF,
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n",
        );
        write(
            dir.path(),
            "/etc/containers/registries.conf.d/50-mirror.conf",
            GOOD,
        );
        assert_eq!(codes(&check(&options).unwrap()), ["ok"]);
        write(
            dir.path(),
            "/etc/containers/registries.conf.d/99-override.conf",
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n",
        );
        assert_eq!(codes(&check(&options).unwrap()), ["containers-no-mirror"]);
    }

    #[test]
    fn absent_without_files_or_tools() {
        let (dir, options) = options_in(&["docker.io"]);
        assert_eq!(codes(&check(&options).unwrap()), ["absent"]);
        write(dir.path(), "/usr/bin/podman", "");
        assert_eq!(codes(&check(&options).unwrap()), ["containers-no-mirror"]);
    }
}
