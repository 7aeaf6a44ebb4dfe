//! `vault-load`: a closed-loop load generator that measures the vault against
//! a no-op gRPC server with the same TLS and server settings.
//!
//! Both servers listen on 127.0.0.1:0. By default they share this process
//! and its tokio runtime with the clients; with `--servers child` they run
//! in a child process (this binary again, with `--serve-child`), apart
//! from the clients, as a deployed vault runs apart from its callers.
//! Either way the comparison is between "the whole vault"
//! and "gRPC over mutual TLS with nothing behind it" under identical
//! conditions. N workers each keep one request in flight, spread
//! round-robin over `--connections` HTTP/2 channels per client identity.
//!
//! ```text
//! cargo build --release --bin vault-load
//! target/release/vault-load --concurrency 64 --seconds 10
//! ```
//!
//! The output ends with Markdown tables meant for BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use tokenvault::client::{ClientPki, channel};
use tokenvault::config::Config;
use tokenvault::devpki::{DevLayout, ensure_dev_dir};
use tokenvault::proto;
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::token_service_server::{TokenService, TokenServiceServer};
use tokenvault::server::{
    health_service, incoming, load_kek, open_vault, reflection_service, serve, server_builder,
    tls_config,
};

// The allocator the vault binary uses (see src/main.rs), for both servers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn Error + Send + Sync>;
type Client = TokenServiceClient<Channel>;

const TOKENIZER: &str = "acme-checkout";
const DETOKENIZER: &str = "acme-payments";
const PURPOSE: &str = "load test";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Tokenize,
    Detokenize,
    /// Tokenize, then detokenize.
    Both,
    /// Tokenize and detokenize against the no-op server only (the vault is
    /// not started): the ceiling of the gRPC + mTLS stack on this machine.
    NoopOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetArg {
    Vault,
    Noop,
    /// No-op then vault for each mode, with ratios and pass/fail.
    Compare,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Tokenize,
    Detokenize,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Tokenize => "tokenize",
            Op::Detokenize => "detokenize",
        }
    }
    /// Throughput the vault must reach, as a fraction of the no-op server's.
    fn target_ratio(self) -> f64 {
        match self {
            Op::Tokenize => 0.5,
            Op::Detokenize => 0.6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Noop,
    Vault,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Noop => "no-op",
            Target::Vault => "vault",
        }
    }
}

/// Vault p99 latency target.
const P99_TARGET_MS: f64 = 5.0;

#[derive(Debug, Parser)]
#[command(
    name = "vault-load",
    about = "Load generator: the tokenization vault vs. a no-op gRPC server over the same mTLS setup"
)]
struct Args {
    /// Workers, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per (target, mode, round).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds. Each round measures no-op then vault back to back for each
    /// mode, so each ratio compares neighbours in time; the verdict uses the
    /// median over rounds, which a burst of load from other processes on a
    /// shared machine moves less than any single run.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = TargetArg::Compare)]
    target: TargetArg,
    /// HTTP/2 channels per client identity; workers are spread over them.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Development data directory (created if missing). Default: a fresh
    /// temporary directory, removed at exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Tokens created before a detokenize run, picked round-robin.
    #[arg(long, default_value_t = 10_000)]
    pool: usize,
    /// Where the two servers run: in this process, sharing its tokio
    /// runtime with the clients (the default, as every result in
    /// BENCHMARKS.md before this option was measured), or in a child
    /// process of their own, apart from the clients, as a deployed vault
    /// runs apart from its callers.
    #[arg(long, value_enum, default_value_t = Servers::InProcess)]
    servers: Servers,
    /// Internal: run as the child that serves (see `--servers child`).
    #[arg(long, hide = true)]
    serve_child: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Servers {
    /// Both servers in one child process; the clients in this one.
    Child,
    /// Servers and clients in this process, on one tokio runtime.
    InProcess,
}

// ---------------------------------------------------------------------------
// Card numbers, built at runtime.

/// The Luhn check digit that completes `body` (digits only).
fn luhn_check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    let check = (10 - (sum % 10)) % 10;
    // `check` is 0..=9.
    b'0' + u8::try_from(check).unwrap_or(0)
}

/// A 16-digit, Luhn-valid number: `4`, the counter in 14 digits, check digit.
fn pan_for(n: u64) -> String {
    let mut s = format!("4{:014}", n % 100_000_000_000_000);
    let c = luhn_check_digit(s.as_bytes());
    s.push(char::from(c));
    s
}

// ---------------------------------------------------------------------------
// The no-op service.

struct NoopService {
    token: String,
    pan: String,
    metadata: proto::CardMetadata,
}

impl NoopService {
    fn new() -> Self {
        let pan = pan_for(7_000_000_000_001);
        // Same shape as a real token: `tok_` + base58 of 22 bytes.
        let token = format!("tok_{}", bs58::encode([0x5a_u8; 22]).into_string());
        let metadata = proto::CardMetadata {
            brand: proto::CardBrand::Visa.into(),
            bin: pan[..8].to_owned(),
            last4: pan[pan.len() - 4..].to_owned(),
            pan_length: 16,
            expiry: Some(expiry()),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        };
        Self {
            token,
            pan,
            metadata,
        }
    }
}

fn expiry() -> proto::Expiry {
    proto::Expiry {
        month: 12,
        year: 2030,
    }
}

#[tonic::async_trait]
impl TokenService for NoopService {
    async fn tokenize(
        &self,
        _request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        Ok(Response::new(proto::TokenizeResponse {
            token: self.token.clone(),
            metadata: Some(self.metadata.clone()),
        }))
    }

    async fn detokenize(
        &self,
        _request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        Ok(Response::new(proto::DetokenizeResponse {
            pan: self.pan.clone(),
            expiry: Some(expiry()),
        }))
    }

    async fn get_token_metadata(
        &self,
        _request: Request<proto::GetTokenMetadataRequest>,
    ) -> Result<Response<proto::GetTokenMetadataResponse>, Status> {
        Ok(Response::new(proto::GetTokenMetadataResponse {
            metadata: Some(self.metadata.clone()),
        }))
    }

    async fn delete_token(
        &self,
        _request: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        Ok(Response::new(proto::DeleteTokenResponse {}))
    }
}

/// Serves the no-op service on the vault's own server settings
/// (`tokenvault::server`: `server_builder` for the request timeout, stream
/// limit and keepalive; `tls_config` and `incoming` for the same
/// certificate and key, client CA required, handshake and connection
/// limits, TCP_NODELAY), with the same message limits, health and (if
/// configured) reflection.
async fn serve_noop(
    listener: TcpListener,
    cfg: Config,
    shutdown: oneshot::Receiver<()>,
) -> Result<(), BoxError> {
    let mut server = server_builder(&cfg);
    let tls = tls_config(&cfg)?;
    let limit = cfg.limits.max_message_bytes;
    let svc = TokenServiceServer::new(NoopService::new())
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let (health, health_svc) = health_service(&cfg);
    health
        .set_serving::<TokenServiceServer<NoopService>>()
        .await;
    let reflection = reflection_service(&cfg)?;
    let incoming = incoming(listener, tls, &cfg);
    server
        .add_service(health_svc)
        .add_optional_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.await;
        })
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Servers.

struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), BoxError>>,
}

impl Running {
    async fn stop(mut self) -> Result<(), BoxError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(joined) => joined?,
            Err(_) => Err("server did not stop within 30 s".into()),
        }
    }
}

async fn start_vault(cfg: &Config) -> Result<Running, BoxError> {
    let env: HashMap<String, String> = HashMap::new();
    let kek = load_kek(cfg, &env)?;
    let vault = open_vault(cfg, kek).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let (tx, rx) = oneshot::channel::<()>();
    let cfg = cfg.clone();
    let task = tokio::spawn(async move {
        serve(listener, &cfg, vault, async move {
            let _ = rx.await;
        })
        .await
        .map_err(BoxError::from)
    });
    Ok(Running {
        url,
        stop: Some(tx),
        task,
    })
}

async fn start_noop(cfg: &Config) -> Result<Running, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_noop(listener, cfg.clone(), rx));
    Ok(Running {
        url,
        stop: Some(tx),
        task,
    })
}

/// Where the clients reach one server, and the process serving it when
/// that is not this one (for its CPU time).
struct Endpoint {
    url: String,
    pid: Option<u32>,
}

/// The servers of one run, started in this process or in a child.
struct ServerSet {
    noop: Option<Endpoint>,
    vault: Option<Endpoint>,
    running: Vec<Running>,
    child: Option<std::process::Child>,
}

impl ServerSet {
    async fn start(args: &Args, root: &Path, targets: &[Target]) -> Result<Self, BoxError> {
        match args.servers {
            Servers::InProcess => Self::in_process(root, targets).await,
            Servers::Child => Self::in_child(args, root),
        }
    }

    async fn in_process(root: &Path, targets: &[Target]) -> Result<Self, BoxError> {
        let cfg = load_config(root)?;
        let mut set = Self {
            noop: None,
            vault: None,
            running: Vec::new(),
            child: None,
        };
        for &t in targets {
            let r = match t {
                Target::Noop => start_noop(&cfg).await?,
                Target::Vault => start_vault(&cfg).await?,
            };
            set.put(t, r.url.clone(), None);
            set.running.push(r);
        }
        Ok(set)
    }

    /// Runs `vault-load --serve-child` on the same data directory and reads
    /// the servers' addresses from its standard output. The child serves
    /// until its standard input closes.
    fn in_child(args: &Args, root: &Path) -> Result<Self, BoxError> {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-child")
            .arg("--data-dir")
            .arg(root)
            .arg("--target")
            .arg(value_name(args.target))
            .arg("--mode")
            .arg(value_name(args.mode))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let mut set = Self {
            noop: None,
            vault: None,
            running: Vec::new(),
            child: None,
        };
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        set.child = Some(child);
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            match line.split_once(' ') {
                Some(("noop", url)) => set.put(Target::Noop, url.to_owned(), Some(pid)),
                Some(("vault", url)) => set.put(Target::Vault, url.to_owned(), Some(pid)),
                _ if line == "ready" => return Ok(set),
                _ => return Err(format!("unexpected line from the serving child: {line}").into()),
            }
        }
        Err("the serving child exited before it was ready".into())
    }

    fn put(&mut self, target: Target, url: String, pid: Option<u32>) {
        let e = Some(Endpoint { url, pid });
        match target {
            Target::Noop => self.noop = e,
            Target::Vault => self.vault = e,
        }
    }

    fn get(&self, target: Target) -> Option<&Endpoint> {
        match target {
            Target::Noop => self.noop.as_ref(),
            Target::Vault => self.vault.as_ref(),
        }
    }

    /// Stops every server and waits for it, so the vault's database is
    /// closed (and checkpointed) before it is read.
    async fn stop(mut self) -> Result<(), BoxError> {
        for r in self.running.drain(..) {
            r.stop().await?;
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        drop(child.stdin.take());
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("the serving child ended with {status}").into())
                };
            }
            if Instant::now() >= give_up {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the serving child did not stop within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The name clap parses back for a `ValueEnum` value.
fn value_name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// The child side of `--servers child`: serves the run's servers, prints
/// their addresses and `ready`, and stops when standard input closes.
async fn serve_child(args: &Args, root: &Path) -> Result<(), BoxError> {
    let (targets, _) = plan(args);
    let set = ServerSet::in_process(root, &targets).await?;
    for t in targets {
        if let Some(e) = set.get(t) {
            println!(
                "{} {}",
                if t == Target::Noop { "noop" } else { "vault" },
                e.url
            );
        }
    }
    println!("ready");
    tokio::task::spawn_blocking(|| {
        use std::io::Read as _;
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    set.stop().await
}

/// The run's config: the dev data directory's, with the detokenize budget
/// raised, since one identity drives the whole load, far above a real
/// caller's budget. It is raised, not switched off, so every call still
/// pays for its check.
fn load_config(root: &Path) -> Result<Config, BoxError> {
    let layout = DevLayout::new(root);
    let env: HashMap<String, String> = HashMap::new();
    let mut cfg = Config::load(&layout.config(), &env)?;
    cfg.limits.detokenize_per_second = tokenvault::config::MAX_DETOKENIZE_RATE;
    cfg.limits.detokenize_burst = tokenvault::config::MAX_DETOKENIZE_RATE;
    Ok(cfg)
}

/// Which servers a run measures, and which operations.
fn plan(args: &Args) -> (Vec<Target>, Vec<Op>) {
    let ops = match args.mode {
        Mode::Tokenize => vec![Op::Tokenize],
        Mode::Detokenize => vec![Op::Detokenize],
        Mode::Both | Mode::NoopOnly => vec![Op::Tokenize, Op::Detokenize],
    };
    let targets = match (args.mode, args.target) {
        (Mode::NoopOnly, _) | (_, TargetArg::Noop) => vec![Target::Noop],
        (_, TargetArg::Vault) => vec![Target::Vault],
        (_, TargetArg::Compare) => vec![Target::Noop, Target::Vault],
    };
    (targets, ops)
}

// ---------------------------------------------------------------------------
// CPU accounting (Linux /proc; absent elsewhere).

/// Busy ticks of the whole machine and of this process (with the serving
/// child, if there is one), in USER_HZ.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    machine_busy: u64,
    own: u64,
}

fn cpu_ticks(child: Option<u32>) -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = cpu
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    let child = match child {
        Some(pid) => process_ticks(&format!("/proc/{pid}/stat"))?,
        None => 0,
    };
    Some(CpuTicks {
        machine_busy: busy,
        own: process_ticks("/proc/self/stat")? + child,
    })
}

/// utime + stime of one process, from its `/proc/<pid>/stat`.
fn process_ticks(path: &str) -> Option<u64> {
    let me = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, i.e. the 12th and 13th after it.
    let rest = me.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (CPU seconds used by this process, CPU seconds used by everything else).
fn cpu_between(a: Option<CpuTicks>, b: Option<CpuTicks>) -> Option<(f64, f64)> {
    let (a, b) = (a?, b?);
    let own = b.own.saturating_sub(a.own);
    let all = b.machine_busy.saturating_sub(a.machine_busy);
    #[allow(clippy::cast_precision_loss)]
    let secs = |t: u64| t as f64 / 100.0;
    Some((secs(own), secs(all.saturating_sub(own))))
}

// ---------------------------------------------------------------------------
// Measurement.

#[derive(Debug, Default)]
struct WorkerOut {
    /// Latency of successful calls started in the measured window, in µs.
    lat_us: Vec<u32>,
    /// Failed calls by gRPC code (warm-up included), with the first message.
    errors: BTreeMap<String, (u64, String)>,
}

#[derive(Debug, Clone)]
struct RunResult {
    round: usize,
    target: Target,
    op: Op,
    ok: u64,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    errors: BTreeMap<String, (u64, String)>,
    /// CPU µs spent per successful call in the measured window by the
    /// clients and both servers together (this process and its child).
    cpu_us_per_call: f64,
    /// Cores' worth of CPU used by other processes during the window.
    other_cores: f64,
}

impl RunResult {
    fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }
    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(code, (n, _))| format!("{n} {code}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn open_channels(url: &str, pki: &ClientPki, n: usize) -> Result<Vec<Channel>, BoxError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(channel(url, pki).await?);
    }
    Ok(out)
}

fn record_error(errors: &mut BTreeMap<String, (u64, String)>, s: &Status) {
    let e = errors
        .entry(format!("{:?}", s.code()))
        .or_insert_with(|| (0, s.message().to_owned()));
    e.0 += 1;
}

/// Tokenizes `n` numbers over `channels` with `concurrency` workers and
/// returns the tokens.
async fn make_pool(
    channels: &[Channel],
    concurrency: usize,
    n: usize,
    pans: Arc<AtomicU64>,
) -> Result<Vec<String>, BoxError> {
    let left = Arc::new(AtomicUsize::new(n));
    let mut tasks = Vec::new();
    for w in 0..concurrency.max(1) {
        let mut client = Client::new(channels[w % channels.len()].clone());
        let left = left.clone();
        let pans = pans.clone();
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                let pan = pan_for(pans.fetch_add(1, Ordering::Relaxed));
                let r = client
                    .tokenize(proto::TokenizeRequest {
                        pan,
                        expiry: Some(expiry()),
                    })
                    .await?;
                tokens.push(r.into_inner().token);
            }
            Ok::<_, Status>(tokens)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

async fn measure(
    round: usize,
    target: Target,
    op: Op,
    at: &Endpoint,
    layout: &DevLayout,
    args: &Args,
    pans: Arc<AtomicU64>,
) -> Result<RunResult, BoxError> {
    let tok_pki = ClientPki::from_dev_dir(&layout.root, TOKENIZER)?;
    let url = at.url.as_str();
    let tok_channels = open_channels(url, &tok_pki, args.connections).await?;
    let pool: Arc<Vec<String>> = Arc::new(match op {
        Op::Tokenize => Vec::new(),
        Op::Detokenize => {
            let t0 = Instant::now();
            let pool = make_pool(&tok_channels, args.concurrency, args.pool, pans.clone()).await?;
            eprintln!(
                "  {}: pre-tokenized {} cards in {:.2} s",
                target.name(),
                pool.len(),
                t0.elapsed().as_secs_f64()
            );
            pool
        }
    });
    let channels = match op {
        Op::Tokenize => tok_channels,
        Op::Detokenize => {
            drop(tok_channels);
            let pki = ClientPki::from_dev_dir(&layout.root, DETOKENIZER)?;
            open_channels(url, &pki, args.connections).await?
        }
    };

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let deadline = measure_from + Duration::from_secs(args.seconds);
    let next_token = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency.max(1) {
        let mut client = Client::new(channels[w % channels.len()].clone());
        let pool = pool.clone();
        let next_token = next_token.clone();
        let pans = pans.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut {
                lat_us: Vec::with_capacity(1 << 14),
                ..WorkerOut::default()
            };
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let res = match op {
                    Op::Tokenize => {
                        let pan = pan_for(pans.fetch_add(1, Ordering::Relaxed));
                        client
                            .tokenize(proto::TokenizeRequest {
                                pan,
                                expiry: Some(expiry()),
                            })
                            .await
                            .map(|_| ())
                    }
                    Op::Detokenize => {
                        let i = next_token.fetch_add(1, Ordering::Relaxed) % pool.len().max(1);
                        let token = pool.get(i).cloned().unwrap_or_default();
                        client
                            .detokenize(proto::DetokenizeRequest {
                                token,
                                purpose: PURPOSE.into(),
                            })
                            .await
                            .map(|_| ())
                    }
                };
                match res {
                    // Latency and throughput count calls started in the
                    // measured window; errors count during warm-up too.
                    Ok(()) if t0 >= measure_from => {
                        let us = t0.elapsed().as_micros();
                        out.lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                    Ok(()) => {}
                    Err(s) => record_error(&mut out.errors, &s),
                }
            }
            out
        }));
    }
    let child = at.pid;
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let a = cpu_ticks(child);
        tokio::time::sleep_until(deadline.into()).await;
        cpu_between(a, cpu_ticks(child))
    });
    let mut lat: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for t in tasks {
        let out = t.await?;
        lat.extend_from_slice(&out.lat_us);
        for (code, (n, msg)) in out.errors {
            errors.entry(code).or_insert((0, msg)).0 += n;
        }
    }
    drop(channels);
    let cpu = sampler.await?;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let idx = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        f64::from(lat[idx]) / 1000.0
    };
    let ok = u64::try_from(lat.len()).unwrap_or(u64::MAX);
    #[allow(clippy::cast_precision_loss)]
    let window = Duration::from_secs(args.seconds.max(1)).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rps = ok as f64 / window;
    Ok(RunResult {
        round,
        target,
        op,
        ok,
        rps,
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: lat.last().map_or(f64::NAN, |&m| f64::from(m) / 1000.0),
        errors,
        cpu_us_per_call: cpu.map_or(f64::NAN, |(own, _)| own * 1e6 / (rps * window)),
        other_cores: cpu.map_or(f64::NAN, |(_, other)| other / window),
    })
}

// ---------------------------------------------------------------------------
// Report.

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn report(args: &Args, results: &[RunResult], compare: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nconcurrency {}, {} connections per identity, {} s measured after {} s warm-up, {} round(s), {} CPUs\n",
        args.concurrency,
        args.connections,
        args.seconds,
        args.warmup,
        args.rounds,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let _ = writeln!(
        s,
        "| round | target | mode | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | CPU µs/call | other load (cores) |"
    );
    let _ = writeln!(s, "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {:.0} | {:.2} |",
            r.round,
            r.target.name(),
            r.op.name(),
            r.rps,
            r.p50,
            r.p99,
            r.p999,
            r.max,
            r.errors_text(),
            r.cpu_us_per_call,
            r.other_cores
        );
    }
    if !compare {
        return s;
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| mode | vault / no-op per round | median ratio | target | vault p99 ms per round | median p99 ms (≤ {P99_TARGET_MS}) | vault errors | result |"
    );
    let _ = writeln!(s, "|---|---|---:|---|---|---:|---:|---|");
    let mut all_pass = true;
    for op in [Op::Tokenize, Op::Detokenize] {
        let mut ratios = Vec::new();
        let mut p99s = Vec::new();
        let mut errors = 0;
        let mut noop_errors = 0;
        for round in 1..=args.rounds {
            let find = |t: Target| {
                results
                    .iter()
                    .find(|r| r.round == round && r.op == op && r.target == t)
            };
            let (Some(v), Some(n)) = (find(Target::Vault), find(Target::Noop)) else {
                continue;
            };
            ratios.push(v.rps / n.rps);
            p99s.push(v.p99);
            errors += v.error_count();
            noop_errors += n.error_count();
        }
        if ratios.is_empty() {
            continue;
        }
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ratio = median(ratios.clone());
        let p99 = median(p99s.clone());
        let thr_ok = ratio >= op.target_ratio();
        let p99_ok = p99 <= P99_TARGET_MS;
        // A no-op that failed calls ran slower than it should, which would
        // flatter the vault: that measurement cannot count either.
        let err_ok = errors == 0 && noop_errors == 0;
        let pass = thr_ok && p99_ok && err_ok;
        all_pass &= pass;
        let mut why = Vec::new();
        if !thr_ok {
            why.push("throughput");
        }
        if !p99_ok {
            why.push("p99");
        }
        if errors > 0 {
            why.push("errors");
        }
        if noop_errors > 0 {
            why.push("no-op errors: measurement invalid");
        }
        let verdict = if pass {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", why.join(", "))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | ≥ {:.1} | {} | {:.2} | {} | {} |",
            op.name(),
            list(&ratios),
            ratio,
            op.target_ratio(),
            list(&p99s),
            p99,
            errors,
            verdict
        );
    }
    let _ = writeln!(s, "\noverall: {}", if all_pass { "PASS" } else { "FAIL" });
    for r in results {
        for (code, (n, msg)) in &r.errors {
            let _ = writeln!(
                s,
                "{} round {} {} error: {n} × {code}, first message: {msg:?}",
                r.target.name(),
                r.round,
                r.op.name()
            );
        }
    }
    s
}

/// Audit rows in the vault's database, by action.
fn audit_counts(db: &Path) -> Result<Vec<(String, i64)>, BoxError> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut st = c.prepare("SELECT action, COUNT(*) FROM audit GROUP BY action ORDER BY action")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

// ---------------------------------------------------------------------------

fn fresh_temp_dir() -> Result<PathBuf, BoxError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let p = std::env::temp_dir().join(format!("vault-load-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let (root, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (fresh_temp_dir()?, true),
    };
    let result = run_in(&args, &root).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn run_in(args: &Args, root: &Path) -> Result<(), BoxError> {
    let layout = ensure_dev_dir(root, "127.0.0.1:0".parse()?)?;
    let (targets, ops) = plan(args);
    let compare = targets.len() == 2;
    let servers = ServerSet::start(args, root, &targets).await?;
    eprintln!("data dir: {}", root.display());
    eprintln!("servers:  {}", value_name(args.servers));
    if let Some(n) = &servers.noop {
        eprintln!("no-op server: {}", n.url);
    }
    if let Some(v) = &servers.vault {
        eprintln!("vault:        {}", v.url);
    }

    // Card numbers continue across runs so every tokenize stores a new one.
    let pans = Arc::new(AtomicU64::new(0));
    let mut results = Vec::new();
    let outcome: Result<(), BoxError> = async {
        for round in 1..=args.rounds {
        for &op in &ops {
            for &target in &targets {
                let at = servers.get(target).ok_or("server not started")?;
                eprintln!(
                    "round {round}: {} / {}: {} workers, {} s warm-up + {} s",
                    target.name(),
                    op.name(),
                    args.concurrency,
                    args.warmup,
                    args.seconds
                );
                let r = measure(round, target, op, at, &layout, args, pans.clone()).await?;
                eprintln!(
                    "  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} ok, errors: {}, \
                     {:.0} CPU µs/call, other processes {:.2} cores",
                    r.rps,
                    r.p50,
                    r.p99,
                    r.p999,
                    r.ok,
                    r.errors_text(),
                    r.cpu_us_per_call,
                    r.other_cores
                );
                results.push(r);
            }
        }
        }
        Ok(())
    }
    .await;

    let had_vault = servers.vault.is_some();
    servers.stop().await?;
    if had_vault {
        match audit_counts(&layout.db()) {
            Ok(rows) => {
                let total: i64 = rows.iter().map(|(_, n)| n).sum();
                let parts: Vec<String> = rows.iter().map(|(a, n)| format!("{a} {n}")).collect();
                eprintln!("audit rows in vault.db: {total} ({})", parts.join(", "));
            }
            Err(e) => eprintln!("cannot count audit rows: {e}"),
        }
    }
    outcome?;
    print!("{}", report(args, &results, compare));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // No tracing subscriber: logging stays off so it cannot skew either side.
    let args = Args::parse();
    if args.concurrency == 0 || args.connections == 0 || args.seconds == 0 || args.rounds == 0 {
        return Err(
            "--concurrency, --connections, --seconds and --rounds must be at least 1".into(),
        );
    }
    if args.serve_child {
        let root = args
            .data_dir
            .clone()
            .ok_or("--serve-child needs --data-dir")?;
        return serve_child(&args, &root)
            .await
            .map_err(|e| -> Box<dyn Error> { e });
    }
    run(args).await.map_err(|e| -> Box<dyn Error> { e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_numbers_are_luhn_valid_and_distinct() {
        let a = pan_for(1);
        let b = pan_for(2);
        assert_ne!(a, b);
        for p in [&a, &b, &pan_for(99_999_999_999_999)] {
            assert_eq!(p.len(), 16);
            assert!(tokenvault::domain::pan::luhn_valid(p.as_bytes()));
        }
    }

    #[test]
    fn median_of_rounds() {
        assert!((median(vec![0.7, 0.4, 0.5]) - 0.5).abs() < 1e-12);
        assert!((median(vec![0.6, 0.4]) - 0.5).abs() < 1e-12);
        assert!(median(Vec::new()).is_nan());
    }
}
