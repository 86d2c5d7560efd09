//! The command line: `check-config` accepts good files (and the embedded default) and refuses
//! bad ones with the file, the key and the reason.

use std::process::Command;

fn check(yaml: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.arg("check-config");
    if let Some(yaml) = yaml {
        let path = dir.path().join("regmirror.yml");
        std::fs::write(&path, yaml).unwrap();
        cmd.arg("--config").arg(&path);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn embedded_default_and_a_good_file_pass() {
    assert_eq!(check(None).0, 0);
    let (code, out) = check(Some("default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'https://registry-1.docker.io' }\n"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn bad_files_name_file_key_and_reason() {
    let cases = [
        ("default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'https://x', colour: blue }\n", "upstreams.docker.io", "colour"),
        ("default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'https://x' }\nstorage: { max_size: lots }\n", "storage.max_size", "lots"),
        ("default_upstream: ghcr.io\nupstreams:\n  docker.io: { url: 'https://x' }\n", "default_upstream", "ghcr.io"),
        ("default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'ftp://x' }\n", "upstreams.docker.io.url", "http"),
        ("default_upstream: docker.io\nupstreams:\n  docker.io: { url: 'https://x' }\ncache: { tag_ttl: soon }\n", "cache.tag_ttl", "soon"),
    ];
    for (yaml, key, reason) in cases {
        let (code, out) = check(Some(yaml));
        assert_eq!(code, 2, "{yaml}\n{out}");
        assert!(out.contains("regmirror.yml"), "names the file: {out}");
        assert!(out.contains(key), "names the key {key}: {out}");
        assert!(out.contains(reason), "gives the reason ({reason}): {out}");
    }
    let (code, out) = check(Some("{"));
    assert_eq!(code, 2, "{out}");
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["check-config", "--config", "/nonexistent/regmirror.yml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/regmirror.yml"));
}
