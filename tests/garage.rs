//! The real-Garage harness itself (tests/common/garage.rs and tests/common/front.rs): a
//! single node and a 3-node cluster store and serve objects through `curl --aws-sigv4`, a
//! cluster keeps serving with one node down, and the nginx front spreads requests
//! round-robin and skips a dead backend. The S3 backend and cluster tests build on these.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Deterministic, incompressible-looking bytes; not a multiple of Garage's 1 MiB block so
/// the last block is partial.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const SIZE: usize = 3 * 1024 * 1024 + 17;

#[tokio::test(flavor = "multi_thread")]
async fn single_node_stores_lists_and_survives_a_restart() {
    let t = Instant::now();
    let mut g = Garage::single().await;
    eprintln!("garage: single node ready in {:?}", t.elapsed());

    let body = payload(SIZE, 1);
    g.put_object("harness/blob", &body).await;
    assert!(g.get_object("harness/blob").await == Some(body.clone()));
    assert_eq!(g.get_object("harness/missing").await, None);
    assert_eq!(
        g.list_objects("harness/").await,
        vec![garage::S3Object {
            key: "harness/blob".into(),
            size: SIZE as u64
        }]
    );
    assert_eq!(g.count_objects("other/").await, 0);

    // The section regmirror's configuration takes, as YAML.
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&format!("s3: {}", g.s3_yaml())).unwrap();
    assert_eq!(yaml["s3"]["endpoint"].as_str(), Some(g.endpoint().as_str()));
    assert_eq!(yaml["s3"]["bucket"].as_str(), Some(g.bucket()));
    assert_eq!(yaml["s3"]["region"].as_str(), Some(g.region()));
    assert_eq!(yaml["s3"]["access_key_id"].as_str(), Some(g.access_key()));
    assert_eq!(
        yaml["s3"]["secret_access_key"].as_str(),
        Some(g.secret_key())
    );
    assert_eq!(yaml["s3"]["path_style"].as_bool(), Some(true));

    // kill -9 and restart on the same data: the object is still there.
    let pid = g.pid(0).unwrap();
    g.stop_node(0);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let t = Instant::now();
    g.start_node(0).await;
    eprintln!("garage: single node restarted in {:?}", t.elapsed());
    assert!(g.get_object("harness/blob").await == Some(body));
}

#[tokio::test(flavor = "multi_thread")]
async fn three_node_cluster_serves_with_one_node_down() {
    let t = Instant::now();
    let mut g = Garage::cluster(3).await;
    eprintln!("garage: 3-node cluster ready in {:?}", t.elapsed());
    assert_eq!(g.endpoints().len(), 3);

    let first = payload(SIZE, 2);
    g.put_object_via(0, "harness/first", &first).await;
    for i in 0..3 {
        assert!(
            g.get_object_via(i, "harness/first").await == Some(first.clone()),
            "node {i}"
        );
    }

    // Replication 3, quorum 2: with one node down, reads and writes both still work.
    g.stop_node(1);
    for i in [0, 2] {
        assert!(
            g.get_object_via(i, "harness/first").await == Some(first.clone()),
            "node {i} with node 1 down"
        );
    }
    let second = payload(SIZE, 3);
    g.put_object_via(2, "harness/second", &second).await;
    assert!(g.get_object_via(0, "harness/second").await == Some(second.clone()));
    assert_eq!(g.count_objects("harness/").await, 2);

    // With two down there is no quorum: the survivor refuses rather than answering stale.
    g.stop_node(2);
    let t = Instant::now();
    let r = g.s3_request_via(0, "GET", "harness/first", "", None).await;
    assert!(
        r.status >= 500,
        "GET with 2 of 3 nodes down: {} {}",
        r.status,
        r.text()
    );
    eprintln!("garage: GET refused in {:?} without a quorum", t.elapsed());

    let t = Instant::now();
    g.start_node(1).await;
    eprintln!(
        "garage: node 1 restarted (quorum back) in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    g.start_node(2).await;
    eprintln!("garage: node 2 restarted in {:?}", t.elapsed());
    for i in 0..3 {
        assert!(
            g.get_object_via(i, "harness/second").await == Some(second.clone()),
            "node {i} after the restarts"
        );
    }
}

/// `python3 -m http.server` serving one file, `who`, whose content is `name`.
async fn static_backend(name: &str) -> (ChildProc, SocketAddr, tempfile::TempDir) {
    let dir = tempdir("front-backend-");
    std::fs::write(dir.path().join("who"), name).unwrap();
    let port = free_port();
    let mut cmd = Command::new(require_tool("python3"));
    cmd.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
        .arg(dir.path())
        .arg(port.to_string());
    let mut proc = ChildProc::spawn(
        &format!("backend {name}"),
        cmd,
        &dir.path().join("server.log"),
    );
    distribution::wait_for_tcp(port, &mut proc, Duration::from_secs(30)).await;
    (proc, SocketAddr::from(([127, 0, 0, 1], port)), dir)
}

async fn who(client: &reqwest::Client, front: &Front) -> String {
    let r = client
        .get(format!("{}/who", front.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", front.error_log());
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn front_round_robins_and_skips_a_dead_backend() {
    let (mut a, a_addr, _a_dir) = static_backend("a").await;
    let (_b, b_addr, _b_dir) = static_backend("b").await;
    let front = Front::start(&[a_addr, b_addr]).await;
    let client = http();

    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(who(&client, &front).await);
    }
    assert_eq!(
        seen,
        ["a", "b", "a", "b", "a", "b"],
        "access log:\n{}",
        front.access_log()
    );

    a.kill9();
    for _ in 0..4 {
        assert_eq!(who(&client, &front).await, "b");
    }
    let log = front.access_log();
    assert!(
        log.contains(&format!("upstream={a_addr}, {b_addr}")),
        "nginx moved on from the dead backend:\n{log}"
    );
}
