//! A real multi-process cluster: a real etcd server, `hyserve worker` processes holding
//! expert shards, and a `hyserve coordinator` in front, all on loopback. Greedy output
//! must be the single-process server's, also while the experts are being rebalanced;
//! with mutual TLS, processes holding a foreign certificate are refused.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyserve_coordinator::cluster::PlacementRecord;
use hyserve_coordinator::membership::EtcdMembership;
use hyserve_proto::v1;
use hyserve_proto::v1::inference_client::InferenceClient;

use crate::support::{hyserve, init_model, run_ok};

/// A child process killed when dropped, and the stderr lines it printed after it
/// started (kept by [`start`]).
struct Proc(Child, std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Proc {
    fn new(child: Child) -> Self {
        Self(child, Default::default())
    }

    /// Waits up to `secs` for a stderr line containing every one of `needles`.
    fn wait_for_log(&self, needles: &[&str], secs: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self
                .1
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with stderr piped and returns it once a stderr line contains `marker`,
/// with that line and the lines before it. Panics with what it printed if it exits first.
fn start(mut cmd: Command, marker: &str, what: &str) -> (Proc, String, Vec<String>) {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} did not start: {e}"));
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if line.contains(marker) {
                    break line;
                }
                seen.push(line);
            }
            _ => panic!(
                "{what} exited before printing {marker:?}:\n{}",
                seen.join("\n")
            ),
        }
    };
    // Keep draining stderr so the process never blocks on a full pipe (the last
    // lines are kept for tests that read the logs).
    let log: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut l = keep.lock().unwrap();
            if l.len() >= 10_000 {
                l.drain(..5_000);
            }
            l.push(line);
        }
    });
    (Proc(child, log), found, seen)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real etcd server on free loopback ports, in a temporary data directory.
fn etcd(dir: &Path) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new(std::env::var("HYSERVE_ETCD_BIN").unwrap_or("etcd".into()));
    cmd.args([
        "--name",
        "test",
        "--data-dir",
        dir.join("etcd").to_str().unwrap(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("test={peer_url}"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "etcd did not start ({e}): install etcd-server (.ci/run does) or set HYSERVE_ETCD_BIN"
        )
    });
    let p = Proc::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not listen on {url}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, url)
}

fn worker(model: &Path, extra: &[&str], name: &str) -> (Proc, String) {
    let (p, addr, _) = worker_metrics(model, extra, name);
    (p, addr)
}

/// [`worker`], with the address of its `/metrics`; its step spans are logged
/// (`hyserve_worker=debug`), so a request can be followed into it.
fn worker_metrics(model: &Path, extra: &[&str], name: &str) -> (Proc, String, String) {
    let mut cmd = hyserve();
    cmd.env("HYSERVE_LOG", "warn,hyserve_worker=debug");
    cmd.args([
        "worker",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--worker-threads",
        "1",
        "--memory-gib",
        "1",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .args(extra);
    let (p, line, before) = start(cmd, "listening on", name);
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the worker prints its address")
        .to_string();
    let metrics = before
        .iter()
        .find_map(|l| l.split("metrics: http://").nth(1))
        .and_then(|r| r.split('/').next())
        .expect("the worker prints its metrics address")
        .to_string();
    (p, addr, metrics)
}

/// Starts `hyserve <role> ...` and returns its gRPC API address.
fn front(model: &Path, role: &str, extra: &[&str]) -> (Proc, String) {
    let (p, grpc, _) = front_http(model, role, extra);
    (p, grpc)
}

/// [`front`], with its HTTP address too.
fn front_http(model: &Path, role: &str, extra: &[&str]) -> (Proc, String, String) {
    let mut cmd = hyserve();
    cmd.args([
        role,
        "--model",
        model.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
    ])
    .args(extra);
    let (p, line, before) = start(cmd, "gRPC API:", role);
    let addr = line
        .trim()
        .strip_prefix("gRPC API:")
        .and_then(|r| r.split_whitespace().next())
        .expect("the address")
        .to_string();
    let http = before
        .iter()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|r| r.split('/').next())
        .expect("the HTTP address")
        .to_string();
    (p, addr, http)
}

/// `GET path` at `http` (a bare HTTP/1.1 request): the status code and the body.
fn http_get(http: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).expect("connects");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

/// A counter or gauge from `/metrics` at `http`.
fn metric(http: &str, name: &str) -> f64 {
    metric_sum(http, &format!("{name} ")).unwrap_or_else(|| panic!("{name} is not on /metrics"))
}

/// The sum of the `/metrics` samples at `http` whose line starts with `prefix` (a
/// name and some of its labels); `None` if there is none.
fn metric_sum(http: &str, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(http, "/metrics");
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32)
        .map(|i| {
            (0..(3 + 4 * i))
                .map(|j| 260 + (i * 37 + j * 13) % 700)
                .collect()
        })
        .collect()
}

/// A greedy request for `max_tokens` tokens after `prompt`.
fn greedy(prompt: &[u32], max_tokens: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Greedy completions of every prompt, sent concurrently.
async fn complete(addr: &str, prompts: &[Vec<u32>], max_tokens: u32) -> Vec<Vec<u32>> {
    generate_all(
        addr,
        prompts.iter().map(|p| greedy(p, max_tokens)).collect(),
    )
    .await
}

/// The generated token ids of every request, sent concurrently.
async fn generate_all(addr: &str, requests: Vec<v1::GenerateRequest>) -> Vec<Vec<u32>> {
    let client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects");
    let mut tasks = Vec::new();
    for req in requests {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.generate(req).await.expect("generates").into_inner();
            r.tokens.iter().map(|t| t.id).collect::<Vec<u32>>()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A tiny model, the single-process server's greedy answers to [`prompts`], a real etcd,
/// and `n_workers` workers registered in it under `cluster`.
struct Fixture {
    _tmp: tempfile::TempDir,
    m: std::path::PathBuf,
    prompts: Vec<Vec<u32>>,
    rt: tokio::runtime::Runtime,
    want: Vec<Vec<u32>>,
    _etcd: Proc,
    url: String,
    etcd_args: Vec<String>,
    workers: Vec<Proc>,
    /// Each worker's `/metrics` address.
    worker_http: Vec<String>,
}

fn fixture(seed: u64, max_tokens: u32, cluster: &str, n_workers: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", seed, &[]);
    let prompts = prompts();
    let rt = runtime();
    let want = {
        let (_serve, addr) = front(&m, "serve", &["--workers", "1"]);
        rt.block_on(complete(&addr, &prompts, max_tokens))
    };
    let (etcd, url) = etcd(tmp.path());
    let etcd_args: Vec<String> = vec![
        "--etcd".into(),
        url.clone(),
        "--cluster".into(),
        cluster.into(),
    ];
    let args: Vec<&str> = etcd_args.iter().map(String::as_str).collect();
    let (workers, worker_http) = (0..n_workers)
        .map(|i| {
            let (p, _, http) = worker_metrics(&m, &args, &format!("w{i}"));
            (p, http)
        })
        .unzip();
    Fixture {
        _tmp: tmp,
        m,
        prompts,
        rt,
        want,
        _etcd: etcd,
        url,
        etcd_args,
        workers,
        worker_http,
    }
}

#[test]
fn etcd_cluster_of_three_workers_matches_one_process_while_rebalancing() {
    let f = fixture(21, 12, "e2e", 3);
    let (m, prompts, rt, want, url) = (&f.m, &f.prompts, &f.rt, &f.want, &f.url);
    assert_eq!(f.workers.len(), 3);
    // Not assigned yet: alive, not ready.
    assert_eq!(http_get(&f.worker_http[0], "/health").0, 200);
    assert_eq!(http_get(&f.worker_http[0], "/ready").0, 503);
    let (_coord, addr, coord_http) = front_http(
        m,
        "coordinator",
        &[
            "--etcd",
            url,
            "--cluster",
            "e2e",
            "--expect-workers",
            "3",
            "--rebalance-secs",
            "0.3",
            "--rebalance-min-rows",
            "16",
        ],
    );
    let membership = EtcdMembership::new(url, "e2e");
    let (registered, first) = rt.block_on(async {
        let w = membership.list().await.unwrap();
        let p = membership
            .load_placement()
            .await
            .unwrap()
            .expect("placement stored");
        (w, serde_json::from_str::<PlacementRecord>(&p).unwrap())
    });
    assert_eq!(
        registered
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        ["w0", "w1", "w2"]
    );
    assert_eq!(first.workers, ["w0", "w1", "w2"]);
    // Every expert is held somewhere, and each worker holds some: the experts are
    // really spread, not replicated.
    for rank in 0..3u32 {
        let held = first
            .holders
            .iter()
            .flatten()
            .filter(|h| h.contains(&rank))
            .count();
        let total = first.holders.iter().map(Vec::len).sum::<usize>();
        assert!(
            held > 0 && held < total,
            "rank {rank} holds {held} of {total}"
        );
    }
    // Serve under load until at least two rebalances have switched the placement;
    // every answer must stay the single process's.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    let last = loop {
        let got = rt.block_on(complete(&addr, prompts, 12));
        assert_eq!(&got, want, "round {rounds}: the cluster's output differs");
        rounds += 1;
        let p: PlacementRecord = rt.block_on(async {
            serde_json::from_str(&membership.load_placement().await.unwrap().unwrap()).unwrap()
        });
        if p.epoch >= first.epoch + 2 {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no two rebalances after {rounds} rounds (epoch {})",
            p.epoch
        );
    };
    // The load was skewed enough to replicate hot experts, and the answers after the
    // last switch are still the same.
    assert!(last.replicas > 0, "{last:?}");
    assert_eq!(&rt.block_on(complete(&addr, prompts, 12)), want);
    // A client's request id reaches every worker process the request's steps ran on
    // (the coordinator schedules it on one; its tokens visit the others' experts, but
    // the id is logged where its sequence runs).
    rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut req = tonic::Request::new(greedy(&prompts[0], 4));
        req.metadata_mut()
            .insert("x-request-id", "e2e-trace-7".parse().unwrap());
        c.generate(req).await.unwrap();
    });
    let logged: Vec<String> = f
        .workers
        .iter()
        .filter_map(|w| w.wait_for_log(&["e2e-trace-7", "step_id"], 5))
        .collect();
    assert!(
        !logged.is_empty(),
        "no worker logged a step of request e2e-trace-7"
    );
    // The operators' view: the coordinator counts the rebalances and shows the epoch,
    // and every worker process its own steps, routed experts and all-to-all traffic.
    assert!(metric(&coord_http, "hyserve_placement_epoch") >= (first.epoch + 2) as f64);
    assert!(metric(&coord_http, "hyserve_rebalances_total") >= 2.0);
    assert!(metric_sum(&coord_http, "hyserve_rebalance_duration_seconds_count").unwrap() >= 2.0);
    assert_eq!(metric(&coord_http, "hyserve_workers_alive"), 3.0);
    for (i, http) in f.worker_http.iter().enumerate() {
        let w = format!("{{worker=\"w{i}\"}}");
        assert_eq!(http_get(http, "/ready").0, 200, "w{i} is assigned");
        let steps = metric(
            http,
            &format!("hyserve_worker_step_duration_seconds_count{w}"),
        );
        assert!(steps > 0.0, "w{i}: {steps} steps");
        let sent = metric(http, &format!("hyserve_all_to_all_bytes_total{w}"));
        assert!(sent > 0.0, "w{i} sent no rows to its peers");
        let routed = metric_sum(http, "hyserve_expert_routed_tokens_total").unwrap();
        assert!(routed > 0.0, "w{i} routed nothing");
        assert!(metric_sum(http, "hyserve_build_info{").unwrap() == 1.0);
    }
}

/// Four workers in two tensor-parallel groups of two: each group shards attention
/// and the shared expert and runs its own sequences, the experts are spread over all
/// four, and the greedy output is the single process's, before and after a rebalance.
#[test]
fn tensor_parallel_groups_match_one_process_while_rebalancing() {
    let f = fixture(25, 12, "tp", 4);
    let (m, prompts, rt, want, url) = (&f.m, &f.prompts, &f.rt, &f.want, &f.url);
    let (_coord, addr) = front(
        m,
        "coordinator",
        &[
            "--etcd",
            url,
            "--cluster",
            "tp",
            "--expect-workers",
            "4",
            "--tensor-parallel",
            "2",
            "--rebalance-secs",
            "0.3",
            "--rebalance-min-rows",
            "16",
        ],
    );
    let membership = EtcdMembership::new(url, "tp");
    let placement = || -> PlacementRecord {
        rt.block_on(async {
            serde_json::from_str(&membership.load_placement().await.unwrap().unwrap()).unwrap()
        })
    };
    let first = placement();
    assert_eq!(first.tensor_parallel, 2, "{first:?}");
    assert!(
        first.notes.iter().any(|n| n.contains("groups of 2")),
        "{:?}",
        first.notes
    );
    for rank in 0..4u32 {
        assert!(
            first.holders.iter().flatten().any(|h| h.contains(&rank)),
            "rank {rank} holds no expert"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    loop {
        let got = rt.block_on(complete(&addr, prompts, 12));
        assert_eq!(&got, want, "round {rounds}: the cluster's output differs");
        rounds += 1;
        let p = placement();
        if p.epoch > first.epoch {
            assert_eq!(p.tensor_parallel, 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rebalance after {rounds} rounds"
        );
    }
    assert_eq!(&rt.block_on(complete(&addr, prompts, 12)), want);
}

#[test]
fn mutual_tls_refuses_foreign_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 22, &[]);
    let (good, foreign) = (tmp.path().join("ca"), tmp.path().join("foreign"));
    run_ok(&[
        "cluster-certs",
        "--out",
        good.to_str().unwrap(),
        "--names",
        "coordinator,w0,w1",
    ]);
    run_ok(&[
        "cluster-certs",
        "--out",
        foreign.to_str().unwrap(),
        "--names",
        "coordinator,w1",
    ]);
    let tls = |dir: &Path, name: &str| -> Vec<String> {
        vec![
            "--tls-ca".into(),
            dir.join("ca.pem").to_str().unwrap().into(),
            "--tls-cert".into(),
            dir.join(format!("{name}.pem")).to_str().unwrap().into(),
            "--tls-key".into(),
            dir.join(format!("{name}.key")).to_str().unwrap().into(),
        ]
    };
    let w0_tls = tls(&good, "w0");
    let w1_tls = tls(&good, "w1");
    let (_w0, a0) = worker(
        &m,
        &w0_tls.iter().map(String::as_str).collect::<Vec<_>>(),
        "w0",
    );
    let (_w1, a1) = worker(
        &m,
        &w1_tls.iter().map(String::as_str).collect::<Vec<_>>(),
        "w1",
    );
    let peers = format!("{a0},{a1}");
    let rt = runtime();

    // A coordinator with a certificate of the cluster CA serves (the two workers
    // exchange activations over mutual TLS too).
    let mut ok = tls(&good, "coordinator");
    ok.extend(["--peers".into(), peers.clone()]);
    {
        let (_coord, addr) = front(
            &m,
            "coordinator",
            &ok.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let got = rt.block_on(complete(&addr, &prompts()[..3], 6));
        assert!(got.iter().all(|t| t.len() == 6), "{got:?}");
    }

    // A coordinator with a foreign certificate cannot reach the workers.
    let stderr = refused(&m, &tls(&foreign, "coordinator"), &peers);
    assert!(stderr.contains(&a0), "the error names the worker: {stderr}");
    assert!(
        stderr.contains("certificate"),
        "the error says why: {stderr}"
    );

    // So does one without TLS at all.
    refused(&m, &[], &peers);

    // A worker with a foreign certificate is refused by the cluster's coordinator.
    let w_foreign = tls(&foreign, "w1");
    let (_wf, af) = worker(
        &m,
        &w_foreign.iter().map(String::as_str).collect::<Vec<_>>(),
        "intruder",
    );
    let stderr = refused(&m, &tls(&good, "coordinator"), &format!("{a0},{af}"));
    assert!(
        stderr.contains(&af),
        "the error names the intruder: {stderr}"
    );
    assert!(
        stderr.contains("certificate"),
        "the error says why: {stderr}"
    );
}

/// Runs a coordinator over `peers` that must fail to start; returns its stderr.
fn refused(model: &Path, tls: &[String], peers: &str) -> String {
    let out = hyserve()
        .arg("coordinator")
        .args(tls)
        .args(["--peers", peers, "--join-timeout-secs", "2"])
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--model", model.to_str().unwrap()])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the coordinator started: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Streams greedy completions of every prompt concurrently; `started` is notified once
/// some stream has produced 4 tokens (generation is then surely under way).
async fn stream(
    addr: &str,
    prompts: &[Vec<u32>],
    max_tokens: u32,
    started: std::sync::Arc<tokio::sync::Notify>,
) -> Vec<Vec<u32>> {
    let client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects");
    let mut tasks = Vec::new();
    for p in prompts {
        let (mut c, started) = (client.clone(), started.clone());
        let req = greedy(p, max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut s = c.generate_stream(req).await.expect("streams").into_inner();
            let mut ids = Vec::new();
            while let Some(m) = s.message().await.expect("the stream survives") {
                ids.extend(m.tokens.iter().map(|t| t.id));
                if ids.len() >= 4 {
                    started.notify_one();
                }
            }
            ids
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[test]
fn a_killed_worker_restarted_elsewhere_loses_no_request() {
    const TOKENS: u32 = 200;
    let mut f = fixture(23, TOKENS, "fault", 3);
    let (_coord, addr) = front(
        &f.m,
        "coordinator",
        &[
            "--etcd",
            &f.url,
            "--cluster",
            "fault",
            "--expect-workers",
            "3",
            "--rebalance-secs",
            "0",
            "--exchange-timeout-ms",
            "1500",
        ],
    );
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let (a, p, s) = (addr.clone(), f.prompts.clone(), started.clone());
    let requests = f.rt.spawn(async move { stream(&a, &p, TOKENS, s).await });
    // SIGKILL rank 1 once tokens are flowing, then start a new process under its name
    // (on another port): the coordinator reassigns every rank and recomputes what was
    // lost. A stream that has 4 of its 200 tokens is surely still running.
    f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), started.notified())
            .await
            .expect("tokens flow before the kill")
    });
    drop(f.workers.remove(1));
    assert!(
        !requests.is_finished(),
        "the requests ended before the kill"
    );
    let args: Vec<&str> = f.etcd_args.iter().map(String::as_str).collect();
    let (replacement, _) = worker(&f.m, &args, "w1");
    f.workers.push(replacement);
    let got = f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(180), requests)
            .await
            .expect("the requests finish after the worker is replaced")
            .unwrap()
    });
    assert_eq!(got, f.want, "a request changed or was lost");
}

/// Greedy chat answers (token ids) to `texts`, through the gRPC API, concurrently.
async fn chat(addr: &str, texts: &[String], max_tokens: u32) -> Vec<Vec<u32>> {
    let requests = texts
        .iter()
        .map(|t| v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Text(t.clone())),
            chat: true,
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        })
        .collect();
    generate_all(addr, requests).await
}

/// Speculation across processes: two workers of the trained model, each with the draft
/// model beside its expert shard, and a coordinator asking them for draft proposals (and,
/// in a second cluster, proposing by prompt lookup itself) that they verify through the
/// expert exchange. The greedy answers to held-out editing prompts are the single
/// process's without speculation, and proposals were made and accepted.
#[test]
fn speculating_cluster_matches_one_process() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let m = root.join("model/assets/hunyuan-tiny");
    let draft = root.join("model/assets/hunyuan-tiny-draft");
    let texts: Vec<String> = std::fs::read_to_string(m.join("heldout.jsonl"))
        .unwrap()
        .lines()
        .take(4)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt_edit"].as_str().unwrap().to_string()
        })
        .collect();
    let rt = runtime();
    let want = {
        let (_serve, addr) = front(&m, "serve", &["--speculation", "off"]);
        rt.block_on(chat(&addr, &texts, 40))
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_etcd, url) = etcd(tmp.path());
    for (cluster, proposer) in [("spec-draft", "draft"), ("spec-ngram", "ngram")] {
        let args = [
            "--etcd",
            &url,
            "--cluster",
            cluster,
            "--draft-model",
            draft.to_str().unwrap(),
        ];
        let _workers: Vec<Proc> = (0..2)
            .map(|i| worker(&m, &args, &format!("{cluster}-w{i}")).0)
            .collect();
        let (_coord, addr, http) = front_http(
            &m,
            "coordinator",
            &[
                "--etcd",
                &url,
                "--cluster",
                cluster,
                "--expect-workers",
                "2",
                "--rebalance-secs",
                "0",
                "--speculation",
                proposer,
                "--spec-depth",
                "3",
            ],
        );
        let got = rt.block_on(chat(&addr, &texts, 40));
        assert_eq!(
            got, want,
            "{proposer}: the speculating cluster's answers differ"
        );
        let proposed = metric(&http, "hyserve_spec_proposed_tokens_total");
        let accepted = metric(&http, "hyserve_spec_accepted_tokens_total");
        assert!(
            accepted > 0.0 && accepted <= proposed,
            "{proposer}: {accepted} of {proposed} proposals accepted"
        );
    }
}
