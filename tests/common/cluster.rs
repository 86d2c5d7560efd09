//! A cluster of regmirror replicas (the real binary) on a shared Garage bucket, for the
//! scale-out tests (tests/cluster.rs, tests/cluster_clients.rs): each replica with its peer
//! channel on an ephemeral port, and waits on the events the tests synchronise on (membership,
//! objects in the bucket).

use std::time::Duration;

use super::garage::Garage;
use super::{free_port, http, Regmirror};

/// The shared secret of the test clusters.
pub const SECRET: &str = "cluster-test-secret-0123456789ab";
/// Hang guard for waits on events.
pub const GUARD: Duration = Duration::from_secs(120);

/// One replica: the real binary, with its peer-channel port.
pub struct Replica {
    pub mirror: Regmirror,
    pub peer_port: u16,
}

impl Replica {
    /// Starts a replica of the cluster `peers` (peer-channel ports, its own included) on the
    /// bucket `s3` (a YAML flow mapping), in front of `upstream`.
    pub async fn start(
        upstream: &str,
        s3: &str,
        peers: &[u16],
        peer_port: u16,
        extra: &str,
    ) -> Replica {
        let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Replica::start_listing(upstream, s3, &peers, peer_port, extra).await
    }

    /// [`Replica::start`] with another membership `refresh` than the tests' 500ms.
    pub async fn start_refreshing(
        upstream: &str,
        s3: &str,
        peers: &[u16],
        peer_port: u16,
        refresh: &str,
    ) -> Replica {
        let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Replica::start_with(upstream, s3, &peers, peer_port, refresh, "", "").await
    }

    /// [`Replica::start`] with more keys in the `cluster` section (a YAML flow mapping's
    /// entries, e.g. `tls: {...}`).
    pub async fn start_clustered(
        upstream: &str,
        s3: &str,
        peers: &[u16],
        peer_port: u16,
        cluster: &str,
    ) -> Replica {
        let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Replica::start_with(upstream, s3, &peers, peer_port, "500ms", cluster, "").await
    }

    /// [`Replica::start`] with the peer list as written (`host:port`), e.g. to name a replica
    /// differently on different replicas.
    pub async fn start_listing(
        upstream: &str,
        s3: &str,
        peers: &[String],
        peer_port: u16,
        extra: &str,
    ) -> Replica {
        Replica::start_with(upstream, s3, peers, peer_port, "500ms", "", extra).await
    }

    async fn start_with(
        upstream: &str,
        s3: &str,
        peers: &[String],
        peer_port: u16,
        refresh: &str,
        cluster: &str,
        extra: &str,
    ) -> Replica {
        let cluster = if cluster.is_empty() {
            String::new()
        } else {
            format!(", {cluster}")
        };
        // `extra` may set its own `cache:` section.
        let cache = if extra.contains("cache:") {
            ""
        } else {
            "cache: { tag_ttl: 5m }\n"
        };
        let yaml = format!(
            "listen: @LISTEN@\n\
             storage: {{ root: @ROOT@, s3: {s3} }}\n\
             {cache}default_upstream: docker.io\n\
             upstreams:\n  docker.io: {{ url: \"{upstream}\" }}\n\
             cluster: {{ peers: [{}], listen: \"127.0.0.1:{peer_port}\", secret: \"{SECRET}\", refresh: {refresh}{cluster} }}\n\
             log: {{ level: debug, format: text }}\n{extra}",
            peers.join(", ")
        );
        let mirror = Regmirror::start(&yaml).await;
        Replica { mirror, peer_port }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.mirror.host().parse().unwrap()
    }

    pub fn peer_address(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    pub async fn metrics(&self) -> String {
        match http()
            .get(format!("{}/metrics", self.mirror.url()))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// The value of the first series of `metrics` whose line starts with `prefix`.
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Starts `n` replicas of one cluster and waits until each sees all of them healthy.
pub async fn cluster(n: usize, upstream: &str, garage: &Garage, extra: &str) -> Vec<Replica> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for port in &ports {
        replicas.push(Replica::start(upstream, &garage.s3_yaml(), &ports, *port, extra).await);
    }
    for replica in &replicas {
        until_healthy(replica, n).await;
    }
    replicas
}

/// Waits until `replica` is ready and sees `n` healthy members.
pub async fn until_healthy(replica: &Replica, n: usize) {
    let wanted = format!("regmirror_cluster_members{{state=\"healthy\"}} {n}");
    tokio::time::timeout(GUARD, async {
        loop {
            let ready = http()
                .get(format!("{}/readyz", replica.mirror.url()))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready && replica.metrics().await.contains(&wanted) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "replica never saw {n} healthy members:\n{}",
            replica.mirror.log()
        )
    });
}

/// Waits until the bucket holds `n` objects under `prefix` (uploads finish after the clients
/// are answered).
pub async fn until_in_bucket(garage: &Garage, prefix: &str, n: usize) {
    tokio::time::timeout(GUARD, async {
        while garage.count_objects(prefix).await < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the bucket never held {n} objects under {prefix}"));
}
