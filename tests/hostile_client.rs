//! What a hostile or unlucky client can do to regmirror's server side (issue 13): a blob file
//! that shrinks while it is sent, header values from an upstream that cannot be headers,
//! silent, half-sent and idle sockets, more sockets than file descriptors, stalled HTTP/2
//! readers, made-up methods and password guessing, odd paths and ranges, and an HTTP stack
//! that would send sendfile's placeholder bytes as data.
//!
//! regmirror runs in-process in front of the fake upstream (tests/fake), through the
//! production server path (`regmirror::serve_with`), except where the process itself is the
//! subject (file descriptor limits), where the binary runs as a child. Waits are on events;
//! [`SAFETY`] only keeps a broken build from hanging.

mod common;
mod fake;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fake::Fake;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for an event before the test calls it a hang.
const SAFETY: Duration = Duration::from_secs(60);

/// regmirror in-process with its own `server:` settings and optional TLS.
struct Mirror {
    url: String,
    addr: SocketAddr,
    root: std::path::PathBuf,
    state: regmirror::AppState,
    _dir: tempfile::TempDir,
}

async fn start(
    fake: &Fake,
    extra: &str,
    tls: Option<&common::pki::Issued>,
    adjust: impl FnOnce(&mut regmirror::config::ServerConfig),
) -> Mirror {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let tls_yaml = tls.map_or(String::new(), |t| {
        format!("tls: {{ cert: {:?}, key: {:?} }}\n", t.cert, t.key)
    });
    let text = format!(
        "listen: 127.0.0.1:0\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{}', read_timeout: 30s }}\nstorage: {{ root: {root:?} }}\n{tls_yaml}{extra}\n",
        fake.url()
    );
    let mut config = regmirror::Config::parse(&text, "test").unwrap();
    adjust(&mut config.server);
    let state = regmirror::state(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reloader = config
        .tls
        .as_ref()
        .map(|t| Arc::new(regmirror::server::tls::Reloader::new(t).unwrap()));
    let scheme = if reloader.is_some() { "https" } else { "http" };
    let listener = regmirror::server::Listener::new(listener, reloader).unwrap();
    let server = config.server.clone();
    let serving = state.clone();
    tokio::spawn(async move {
        regmirror::serve_with(listener, serving, &server, std::future::pending())
            .await
            .unwrap()
    });
    Mirror {
        url: format!("{scheme}://{addr}"),
        addr,
        root,
        state,
        _dir: dir,
    }
}

fn blob_path(root: &std::path::Path, digest: &regmirror::oci::Digest) -> std::path::PathBuf {
    let hex = digest.as_str().trim_start_matches("sha256:");
    root.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("error bodies are OCI JSON: {e}: {bytes:?}"));
    let code = body["errors"][0]["code"].as_str().unwrap_or_default();
    (status, code.to_owned())
}

fn plain_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(SAFETY)
        .build()
        .unwrap()
}

/// Item 1: a cached blob that shrinks on disk while it is being sent. Only that transfer may
/// fail; the process (here: the test process itself) survives and serves the next request.
async fn truncate_mid_response(client: reqwest::Client, m: &Mirror, fake: &Fake) {
    const SIZE: usize = 32 << 20;
    let image = fake.put_image("library/big", "1", &[SIZE], 41);
    let digest = image.layers[0].0.clone();
    let url = format!("{}/v2/big/blobs/{digest}", m.url);
    // The miss fills the cache; the next GET is a hit read from the file.
    let warm = client.get(&url).send().await.unwrap();
    assert_eq!(warm.bytes().await.unwrap().len(), SIZE);
    let path = blob_path(&m.root, &digest);
    assert!(path.exists(), "cached at {}", path.display());

    let mut response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = 0usize;
    while received < 1 << 20 {
        received += response.chunk().await.unwrap().expect("more body").len();
    }
    // Let the server run into the stalled client, so that it holds a chunk it has not sent
    // yet when the file shrinks (where a mapped chunk raised SIGBUS). The pass does not depend
    // on this wait; it only makes the old failure certain.
    let served = || m.state.metrics.served_bytes_total("cache");
    let mut last = served();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = served();
        if now == last {
            break;
        }
        last = now;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break "end",
            Err(_) => break "error",
        }
    };
    assert!(
        received < SIZE,
        "the transfer of a truncated file cannot complete ({ended} after {received} bytes)"
    );
    // The server lives on and answers the next client.
    let r = client.get(format!("{}/v2/", m.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/v2/big/manifests/1", m.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_truncated_mid_response_over_h2c_fails_only_that_transfer() {
    let fake = Fake::start().await;
    let m = start(&fake, "", None, |_| {}).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(SAFETY)
        .build()
        .unwrap();
    truncate_mid_response(client, &m, &fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_truncated_mid_response_over_https_fails_only_that_transfer() {
    let fake = Fake::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new(pki.path(), "ca");
    let server = ca.server("mirror");
    let m = start(&fake, "", Some(&server), |_| {}).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca.cert).unwrap()).unwrap();
    // HTTP/1.1 over TLS: the path that encrypts from the body's buffers.
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([root])
        .http1_only()
        .timeout(SAFETY)
        .build()
        .unwrap();
    truncate_mid_response(client, &m, &fake).await;
}

/// Item 4: a manifest whose body declares a media type with a control character (and whose
/// upstream sent no usable Content-Type) is refused with an OCI error, every time, and the
/// server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_type_with_a_control_character_is_an_error_not_a_panic() {
    let fake = Fake::start().await;
    let config = fake.put_blob(Bytes::from_static(b"{}"));
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json\u0001","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[]}}"#
    );
    fake.put_manifest("library/evil", "1", Bytes::from(body), "text/plain");
    let m = start(&fake, "", None, |_| {}).await;
    let http = plain_client();
    for _ in 0..2 {
        let r = http
            .get(format!("{}/v2/evil/manifests/1", m.url))
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(error_code(r).await, (502, "UNAVAILABLE".to_owned()));
    }
    let r = http.get(format!("{}/v2/", m.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Item 15 (routing): malformed tags, pagination numbers, unknown endpoints, request targets
/// over 64 KiB, repositories with operation-like segments, signed range numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_paths_and_ranges_get_the_documented_answers() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[10_000], 5);
    let odd = fake.put_image("a/manifests/b", "latest", &[100], 6);
    let m = start(&fake, "", None, |_| {}).await;
    let http = plain_client();
    let get = |path: String| http.get(format!("{}{path}", m.url)).send();

    let cases = [
        (
            "/v2/app/manifests/.INVALID_MANIFEST_NAME".to_owned(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/_catalog?n=abc".to_owned(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        (
            "/v2/app/tags/list?n=abc".to_owned(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        ("/v2/app/no/such/endpoint".to_owned(), 404, "UNSUPPORTED"),
    ];
    for (path, status, code) in cases {
        let r = get(path.clone()).await.unwrap();
        assert_eq!(
            error_code(r).await,
            (status, code.to_owned()),
            "{}",
            &path[..path.len().min(80)]
        );
    }
    assert!(
        fake.counters.requests.lock().unwrap().is_empty(),
        "none of these reaches the upstream"
    );

    // Request targets over 64 KiB, and heads too large for the server's buffer, which hyper
    // refuses before any route: still an OCI error body.
    for (pad, status) in [(70_000, 414), (200_000, 431)] {
        let mut s = TcpStream::connect(m.addr).await.unwrap();
        let request = format!(
            "GET /v2/app/manifests/1?pad={} HTTP/1.1\r\nhost: x\r\n\r\n",
            "a".repeat(pad)
        );
        // The server may answer and close before it has read everything.
        let _ = s.write_all(request.as_bytes()).await;
        let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("an OCI error body: {e}: {got}"));
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED", "{got}");
    }

    // A repository with a segment named like an operation.
    let r = get("/v2/a/manifests/b/manifests/latest".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), odd.manifest);

    // `+1` is not a number of the Range grammar: the header is ignored, the whole blob sent.
    let (digest, bytes) = image.layers[0].clone();
    let r = http
        .get(format!("{}/v2/app/blobs/{digest}", m.url))
        .header("range", "bytes=+1-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), bytes);
}

/// Item 10: made-up methods are one `other` series, not one series each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_create_metrics_series() {
    let fake = Fake::start().await;
    let m = start(&fake, "", None, |_| {}).await;
    let http = plain_client();
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("XMETHOD{i}").as_bytes()).unwrap();
        http.request(method, format!("{}/v2/", m.url))
            .send()
            .await
            .unwrap();
    }
    let text = m.state.metrics.render();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("regmirror_http_requests_total{"))
        .collect();
    assert!(
        series.iter().all(|l| !l.contains("XMETHOD")),
        "a client-chosen method became a label: {series:#?}"
    );
    assert!(series.iter().any(|l| l.contains("method=\"other\"")));
    assert!(series.len() <= 4, "{series:#?}");
}

/// Item 10: password guessing from one address is answered 429 once its budget is spent,
/// without running bcrypt; another address still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_client_address() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("right", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let m = start(
        &fake,
        &format!("auth: {{ htpasswd: {htpasswd:?} }}"),
        None,
        |_| {},
    )
    .await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .no_proxy()
            .local_address(std::net::IpAddr::from(ip))
            .timeout(SAFETY)
            .build()
            .unwrap()
    };
    let guesser = from([127, 0, 0, 1]);
    let mut statuses = Vec::new();
    let mut throttled = None;
    for i in 0..15 {
        let r = guesser
            .get(format!("{}/v2/", m.url))
            .basic_auth("alice", Some(format!("guess{i}")))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 && throttled.is_none() {
            let retry_after = r.headers().get("retry-after").cloned();
            throttled = Some((retry_after, error_code(r).await));
        }
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    let (retry_after, (_, code)) = throttled.unwrap();
    assert_eq!(code, "TOOMANYREQUESTS");
    assert!(retry_after.is_some(), "429 says when to retry");

    let r = from([127, 0, 0, 2])
        .get(format!("{}/v2/", m.url))
        .basic_auth("alice", Some("right"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another address is not affected");
}

/// Reads until the server closes the connection (EOF or reset); what it sent before.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(SAFETY, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open ({} bytes received)",
                got.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Item 6: silent, half-sent and idle keep-alive sockets are closed by the server, on
/// HTTP/1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_sent_and_idle_connections_are_closed() {
    let fake = Fake::start().await;
    let m = start(&fake, "", None, |s| {
        s.header_read_timeout = regmirror::config::HumanDuration(Duration::from_secs(1));
        s.idle_timeout = regmirror::config::HumanDuration(Duration::from_secs(1));
    })
    .await;

    let silent = async {
        let mut s = TcpStream::connect(m.addr).await.unwrap();
        until_closed(&mut s).await
    };
    let half_sent = async {
        let mut s = TcpStream::connect(m.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        until_closed(&mut s).await
    };
    let idle_keep_alive = async {
        let mut s = TcpStream::connect(m.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut s).await
    };
    let idle_h2 = async {
        let tcp = TcpStream::connect(m.addr).await.unwrap();
        let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let request = http::Request::get(format!("http://{}/v2/", m.addr))
            .body(())
            .unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        // Then nothing: the server ends the connection.
        tokio::time::timeout(SAFETY, driver)
            .await
            .expect("the server kept the idle HTTP/2 connection open")
            .unwrap()
            .ok();
    };
    let (silent, half_sent, idle, ()) = tokio::join!(silent, half_sent, idle_keep_alive, idle_h2);
    assert!(silent.is_empty());
    assert!(!String::from_utf8_lossy(&half_sent).contains("200 OK"));
    assert!(String::from_utf8_lossy(&idle).starts_with("HTTP/1.1 200"));
}

/// Item 6: `server.max_connections` bounds what is served at once; a normal client is not
/// locked out: an idle connection is closed to make room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let fake = Fake::start().await;
    let m = start(&fake, "", None, |s| {
        s.max_connections = Some(2);
        s.idle_timeout = regmirror::config::HumanDuration(Duration::from_secs(2));
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(m.addr).await.unwrap());
    }
    let mut s = TcpStream::connect(m.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut s).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // The server closed a silent connection to free the slot before it took the third, and on
    // loopback that FIN is already here: at least one of them reads as closed.
    let closed = silent.iter().filter(|s| closed_by_peer(s)).count();
    assert!(
        closed >= 1,
        "the third connection was served while two others held both slots"
    );
}

/// Whether the peer closed `s` (EOF or reset), without waiting: a peeking non-blocking read.
fn closed_by_peer(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 1];
    // SAFETY: a one-byte read into a live buffer on a live descriptor.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// The real binary with `RLIMIT_NOFILE` = `fds` (soft and hard: it cannot raise it), the given
/// `server:` settings and an upstream that is never reached. Answers the process, its base URL
/// and its log file.
async fn binary_with_fd_limit(
    dir: &std::path::Path,
    fds: u64,
    server: &str,
) -> (common::ChildProc, String, std::path::PathBuf) {
    use std::os::unix::process::CommandExt;
    let port = common::free_port();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nstorage: {{ root: {:?} }}\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: 'http://127.0.0.1:9' }}\nserver: {server}\n",
            dir.join("data")
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.arg("serve").arg("--config").arg(&config);
    common::no_proxy(&mut cmd);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: fds,
                rlim_max: fds,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let log = dir.join("regmirror.log");
    let mut proc = common::ChildProc::spawn("regmirror", cmd, &log);
    let url = format!("http://127.0.0.1:{port}");
    common::wait_for_v2(&url, &mut proc, SAFETY).await;
    (proc, url, log)
}

/// Item 6 (issue 21 item 3): with fewer file descriptors than sockets thrown at it and a
/// connection limit above what they hold, accept fails with EMFILE: the accept loop survives
/// it, closes idle sockets to make room (their idle timeout is an hour away) and serves a
/// normal client. The binary runs with RLIMIT_NOFILE = 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, url, log) = binary_with_fd_limit(
        dir.path(),
        64,
        "{ max_connections: 1000, header_read_timeout: 1h, idle_timeout: 1h }",
    )
    .await;
    let port = url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    // More idle sockets than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let r = tokio::time::timeout(SAFETY, plain_client().get(format!("{url}/v2/")).send())
        .await
        .expect("a normal client is answered")
        .expect("a normal client is served");
    assert_eq!(r.status(), 200);
    assert!(proc.exited().is_none(), "regmirror is still running");
    let closed = idle.iter().filter(|s| closed_by_peer(s)).count();
    drop(idle);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("accept failed"),
        "the test did exhaust the descriptors"
    );
    assert!(closed >= 1, "no idle socket was closed to make room");
}

/// Issue 21 item 3: under `ulimit -n 256` (soft and hard, so nothing can be raised), 300
/// clients each hold an idle keep-alive connection after one request, then a new client
/// comes: every one of them is answered, because the default connection limit follows the
/// descriptor limit and the connections idle the longest are closed to make room. Idle and
/// header timeouts are an hour away: without eviction the 300 would hold every descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_do_not_lock_out_new_clients() {
    const IDLE: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, url, log) = binary_with_fd_limit(
        dir.path(),
        256,
        "{ header_read_timeout: 1h, idle_timeout: 1h }",
    )
    .await;
    let port = url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    // The limit and the connection limit it implies are in the first lines of the log.
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .take(5)
        .find(|l| l.contains("file descriptors and connection limit"))
        .unwrap_or_else(|| panic!("no limits line in the first lines:\n{text}"));
    assert!(line.contains("fd_limit=256"), "{line}");
    assert!(line.contains("max_connections=80"), "{line}");

    let request = b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut held = Vec::new();
    for i in 0..IDLE {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(request).await.unwrap();
        let head = tokio::time::timeout(SAFETY, read_head(&mut s))
            .await
            .unwrap_or_else(|_| panic!("idle client {i} was never answered"));
        assert!(head.starts_with("HTTP/1.1 200"), "client {i}: {head}");
        held.push(s);
    }
    let r = tokio::time::timeout(SAFETY, plain_client().get(format!("{url}/v2/")).send())
        .await
        .expect("a new client is answered")
        .expect("a new client is served");
    assert_eq!(r.status(), 200);
    assert!(proc.exited().is_none(), "regmirror is still running");
    // The oldest idle connections made room; the newest are still open.
    let closed: Vec<bool> = held.iter().map(closed_by_peer).collect();
    let evicted = closed.iter().filter(|c| **c).count();
    eprintln!("{evicted} of {IDLE} idle connections closed to make room");
    assert!(evicted >= IDLE - 80, "{evicted} closed");
    assert!(closed[0] && !closed[IDLE - 1], "oldest closed first");
    let metrics = plain_client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("regmirror_connections_evicted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no eviction counter:\n{metrics}"));
    assert!(
        counted >= evicted as u64,
        "{counted} counted, {evicted} closed"
    );
}

/// Reads an HTTP/1 response head and its `content-length` body, leaving the connection open.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if got.len() >= end + 4 + len {
            return head;
        }
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    rss_of("self")
}

/// Resident memory of process `pid` (`self` for this one), in bytes.
fn rss_of(pid: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * rustix::param::page_size() as u64
}

/// Opens `streams` GETs of `path` on each of `conns` HTTP/2 connections whose client reads
/// nothing (a 1 KiB window never released), waits until every stream the server took has
/// sent its first bytes, and answers (streams the server allows per connection, RSS growth).
async fn stalled_h2_readers(addr: SocketAddr, path: &str, conns: usize) -> (usize, u64) {
    stalled_h2_readers_of(addr, path, conns, &rss).await
}

/// [`stalled_h2_readers`], measuring the resident memory `rss` gives.
async fn stalled_h2_readers_of(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    rss: &dyn Fn() -> u64,
) -> (usize, u64) {
    let before = rss();
    let mut held = Vec::new();
    let mut allowed = usize::MAX;
    for _ in 0..conns {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (h2, conn) = h2::client::Builder::new()
            .initial_window_size(1024)
            .initial_connection_window_size(1024 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        // The server's SETTINGS have arrived once a request went through.
        let (response, _) = h2
            .send_request(
                http::Request::get(format!("http://{addr}/v2/"))
                    .body(())
                    .unwrap(),
                true,
            )
            .unwrap();
        response.await.unwrap();
        let limit = h2.current_max_send_streams();
        allowed = allowed.min(limit);
        let mut waits = Vec::new();
        for _ in 0..limit.min(400) {
            h2 = h2.ready().await.unwrap();
            let request = http::Request::get(format!("http://{addr}{path}"))
                .body(())
                .unwrap();
            let (response, _) = h2.send_request(request, true).unwrap();
            waits.push(async move {
                let mut body = response.await.unwrap().into_body();
                // The first DATA frame: the server has read a chunk for this stream.
                let first = body.data().await.unwrap().unwrap();
                (body, first)
            });
        }
        held.push((h2, futures_util::future::join_all(waits).await));
    }
    let grown = rss().saturating_sub(before);
    drop(held);
    (allowed, grown)
}

/// Item 7: HTTP/2 clients that stop reading hold a bounded amount of memory: a bounded number
/// of streams per connection, each holding at most one read chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_http2_readers_hold_bounded_memory() {
    const CONNS: usize = 4;
    let fake = Fake::start().await;
    let stored = fake.put_image("library/stored", "1", &[8 << 20], 7);
    let filling = fake.put_image("library/filling", "1", &[64 << 20], 8);
    let m = start(&fake, "", None, |_| {}).await;
    let http = plain_client();
    let (digest, _) = stored.layers[0].clone();
    let stored_path = format!("/v2/stored/blobs/{digest}");
    let warm = http.get(format!("{}{stored_path}", m.url)).send().await;
    assert_eq!(warm.unwrap().bytes().await.unwrap().len(), 8 << 20);

    // A first round touches the code and allocator paths, so the measured one sees only what
    // the streams hold.
    tokio::time::timeout(SAFETY, stalled_h2_readers(m.addr, &stored_path, 1))
        .await
        .expect("every stream got its first bytes");
    let (allowed, grown) =
        tokio::time::timeout(SAFETY, stalled_h2_readers(m.addr, &stored_path, CONNS))
            .await
            .expect("every stream got its first bytes");
    // What a stalled stream may hold (one read chunk and HTTP/2's send buffer).
    let per_stream = PER_READER;
    // Slack for what the rest of the process (other tests of this binary run alongside) and the
    // allocator hold; the stream limit itself is asserted exactly below.
    let bound = (CONNS * allowed) as u64 * per_stream + (40 << 20);
    eprintln!(
        "stored blob: {CONNS} connections × {allowed} stalled streams: RSS +{} KiB (bound {} KiB)",
        grown >> 10,
        bound >> 10
    );
    assert!(allowed <= 32, "{allowed} streams per connection");
    assert!(grown <= bound, "RSS grew {grown} bytes, bound {bound}");

    // A blob still being filled (the upstream trickles it): the readers follow the download.
    fake.faults.chunk_delay_ms.store(20, Ordering::SeqCst);
    let (digest, _) = filling.layers[0].clone();
    let filling_path = format!("/v2/filling/blobs/{digest}");
    let (allowed, grown) =
        tokio::time::timeout(SAFETY, stalled_h2_readers(m.addr, &filling_path, CONNS))
            .await
            .expect("every stream got its first bytes");
    let per_stream = PER_READER;
    let bound = (CONNS * allowed) as u64 * per_stream + (40 << 20);
    eprintln!(
        "blob being filled: {CONNS} connections × {allowed} stalled streams: RSS +{} KiB (bound {} KiB)",
        grown >> 10,
        bound >> 10
    );
    assert!(grown <= bound, "RSS grew {grown} bytes, bound {bound}");
    fake.faults.chunk_delay_ms.store(0, Ordering::SeqCst);
}

/// How a stalled reader talks to the server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Talk {
    Http1,
    Https1,
    H2c,
}

/// What a stalled reader may cost the server at most, per HTTP/1 connection or HTTP/2 stream
/// (issue 21 item 5, the README's memory bound).
const PER_READER: u64 = 256 << 10;

/// The real binary in front of `fake` with sendfile off (so stored blobs take the copying
/// path, the one that holds memory), over TLS for [`Talk::Https1`].
async fn binary_in_front_of(
    fake: &Fake,
    dir: &std::path::Path,
    talk: Talk,
) -> (common::ChildProc, u16, Option<std::path::PathBuf>) {
    let port = common::free_port();
    let (tls, ca) = if talk == Talk::Https1 {
        let ca = common::pki::Ca::new(dir, "ca");
        let server = ca.server("mirror");
        (
            format!(
                "tls: {{ cert: {:?}, key: {:?} }}\n",
                server.cert, server.key
            ),
            Some(ca.cert),
        )
    } else {
        (String::new(), None)
    };
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nstorage: {{ root: {:?} }}\ndefault_upstream: docker.io\nupstreams:\n  docker.io: {{ url: '{}', read_timeout: 5m }}\nserver: {{ sendfile: off }}\n{tls}",
            dir.join("data"),
            fake.url()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regmirror"));
    cmd.arg("serve").arg("--config").arg(&config);
    common::no_proxy(&mut cmd);
    let mut proc = common::ChildProc::spawn("regmirror", cmd, &dir.join("regmirror.log"));
    common::distribution::wait_for_tcp(port, &mut proc, SAFETY).await;
    (proc, port, ca)
}

/// An HTTP/1 GET of `path` whose client takes the head and the first body bytes, then reads
/// nothing more (with a 4 KiB receive buffer, so the server soon has to hold what it sends).
async fn stalled_http1_reader(
    port: u16,
    path: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Box<dyn std::any::Any + Send> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    async fn first_bytes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        s: &mut S,
        request: &[u8],
    ) {
        s.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The head and at least one byte of body.
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(
                    got.starts_with(b"HTTP/1.1 200"),
                    "{:?}",
                    String::from_utf8_lossy(&got[..end])
                );
                if got.len() > end + 4 {
                    return;
                }
            }
        }
    }
    match tls {
        None => {
            let mut tcp = tcp;
            first_bytes(&mut tcp, request.as_bytes()).await;
            Box::new(tcp)
        }
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            first_bytes(&mut tls, request.as_bytes()).await;
            Box::new(tls)
        }
    }
}

/// The body length of a whole HTTP/1 GET of `path` (`connection: close`).
async fn get_whole(port: u16, path: &str, tls: Option<&tokio_rustls::TlsConnector>) -> usize {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let mut got = Vec::new();
    match tls {
        None => {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes()).await.unwrap();
            tcp.read_to_end(&mut got).await.unwrap();
        }
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(request.as_bytes()).await.unwrap();
            // A peer that closes without close_notify is an error to rustls; the length says
            // whether everything came.
            let _ = tls.read_to_end(&mut got).await;
        }
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"));
    got.len() - end - 4
}

/// Waits until the resident memory of `pid` has stopped growing (ten samples 100 ms apart
/// within 64 KiB): the servers' writes to the stalled readers have all run into a full socket.
/// A measurement, not an assertion on time: a slow machine only settles later.
async fn settled_rss(pid: &str) -> u64 {
    let mut last = rss_of(pid);
    let mut steady = 0;
    let deadline = std::time::Instant::now() + SAFETY;
    while steady < 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_of(pid);
        steady = if now.abs_diff(last) <= 64 << 10 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    last
}

/// Issue 21 item 5: what stalled readers cost the real server, per HTTP/1 connection and per
/// HTTP/2 stream, over plain HTTP/1, HTTP/1 over TLS and h2c, of a stored blob (sendfile off:
/// the copying path) and of a blob being filled (the upstream holds the rest of it back):
/// at most 256 KiB each. Each case runs in a fresh process, so the allocator reuses nothing a
/// previous case freed; the growth of its resident memory is divided by the readers it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_readers_hold_at_most_256_kib_each() {
    const READERS: usize = 100;
    const H2_CONNS: usize = 4;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = Fake::start().await;
    let stored = fake.put_image("library/stored", "1", &[16 << 20], 7);
    let (stored, _) = stored.layers[0].clone();
    let mut report = Vec::new();
    let mut gates = Vec::new();
    for talk in [Talk::Http1, Talk::Https1, Talk::H2c] {
        for filling in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (proc, port, ca) = binary_in_front_of(&fake, dir.path(), talk).await;
            let pid = proc.pid().to_string();
            let connector = ca.map(|ca| {
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                let config = rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                tokio_rustls::TlsConnector::from(Arc::new(config))
            });
            let path = if filling {
                // A new blob per case, whose upstream sends 24 MiB and then waits for a gate
                // that opens when the fake goes.
                let seed = 20 + report.len() as u64;
                let image = fake.put_image("library/filling", &seed.to_string(), &[64 << 20], seed);
                let (gate, held) = tokio::sync::watch::channel(false);
                *fake.faults.hold.lock().unwrap() = Some((24 << 20, held));
                gates.push(gate);
                format!("/v2/filling/blobs/{}", image.layers[0].0)
            } else {
                // Stored: fetched once in full before the baseline.
                let path = format!("/v2/stored/blobs/{stored}");
                let got = get_whole(port, &path, connector.as_ref()).await;
                assert_eq!(got, 16 << 20, "{talk:?} warm-up");
                path
            };
            let before = settled_rss(&pid).await;
            let (readers, grown) = if talk == Talk::H2c {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let rss = || rss_of(&pid);
                let (allowed, grown) = tokio::time::timeout(
                    SAFETY,
                    stalled_h2_readers_of(addr, &path, H2_CONNS, &rss),
                )
                .await
                .expect("every stream got its first bytes");
                (H2_CONNS * allowed, grown)
            } else {
                let mut held = Vec::new();
                for _ in 0..READERS {
                    held.push(
                        tokio::time::timeout(
                            SAFETY,
                            stalled_http1_reader(port, &path, connector.as_ref()),
                        )
                        .await
                        .expect("a reader got its first bytes"),
                    );
                }
                let grown = settled_rss(&pid).await.saturating_sub(before);
                drop(held);
                (READERS, grown)
            };
            let each = grown / readers as u64;
            let what = format!(
                "{talk:?} {}: {readers} stalled readers, RSS +{} KiB, {} KiB each",
                if filling {
                    "blob being filled"
                } else {
                    "stored blob"
                },
                grown >> 10,
                each >> 10
            );
            eprintln!("{what}");
            report.push((what, each));
            drop(proc);
        }
    }
    for (what, each) in &report {
        assert!(*each <= PER_READER, "{what}: over {} KiB", PER_READER >> 10);
    }
}

/// Item 16: when the HTTP stack would copy sendfile's placeholder frames (here an IO that
/// says it cannot write vectored, as a careless wrapper would), the start-up self-test
/// notices, sendfile is turned off (visible in the metrics) and cache hits stay byte-exact.
/// With a sound stack, sendfile is on and its byte counter moves as sendfile(2) sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendfile_fails_closed_when_the_stack_would_send_placeholders() {
    let fake = Fake::start().await;
    let image = fake.put_image("library/app", "1", &[3 << 20], 9);
    let (digest, bytes) = image.layers[0].clone();
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(SAFETY)
        .build()
        .unwrap();
    for broken in [true, false] {
        let m = start(&fake, "", None, |s| s.break_vectored_writes = broken).await;
        let url = format!("{}/v2/app/blobs/{digest}", m.url);
        for expected in ["miss", "hit"] {
            let r = http.get(&url).send().await.unwrap();
            assert_eq!(r.headers()["x-regmirror-cache"], expected);
            let got = r.bytes().await.unwrap();
            assert!(
                got == bytes,
                "broken={broken}: the body differs from the blob"
            );
        }
        let metrics = m.state.metrics.render();
        let enabled = metrics
            .lines()
            .find(|l| l.starts_with("regmirror_sendfile_enabled "))
            .unwrap_or_else(|| panic!("no regmirror_sendfile_enabled in\n{metrics}"));
        let sent = m.state.metrics.sendfile_bytes_total();
        if broken {
            assert_eq!(enabled, "regmirror_sendfile_enabled 0");
            assert_eq!(sent, 0);
        } else {
            assert_eq!(enabled, "regmirror_sendfile_enabled 1");
            assert_eq!(
                sent,
                bytes.len() as u64,
                "one hit's bytes, as sendfile(2) sent them"
            );
        }
    }
}
