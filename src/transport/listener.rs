//! Accepting connections: mutual TLS, with bounded handshakes and a bounded
//! number of connections.
//!
//! The vault runs the TLS handshake itself (rather than leaving it to
//! tonic) so that the two kinds of connection get separate budgets:
//!
//! - **Handshakes** (no one authenticated yet): at most
//!   `limits.max_handshakes` at once, each closed after
//!   `limits.handshake_timeout_ms`. When the budget is full, a new
//!   connection closes one pending handshake, chosen in this order:
//!   1. the oldest, if it has been pending for a second or more: a real
//!      client finishes its handshake in milliseconds, so it is stalled;
//!   2. else, if one source (an IPv4 address or an IPv6 /64) holds more
//!      than half the budget, that source's oldest: a flood from one host
//!      closes only its own handshakes;
//!   3. else the oldest.
//!
//!   Stalled connections are thus closed first wherever they come from, a
//!   flood from one host cannot close anyone else's, and a flood spread
//!   over many hosts keeps callers out only if it opens `max_handshakes`
//!   new connections within one handshake's time. A busy shared source (a
//!   NAT gateway) loses its own oldest handshakes only once it holds more
//!   than half the budget at once.
//! - **Connections** (the handshake verified a client certificate from the
//!   configured CA): at most `limits.max_connections`. While they are all
//!   taken the vault stops accepting, so new connections wait in the
//!   kernel's backlog. One that completes its handshake when none is free
//!   (a burst can be shaking hands as the last slots go) waits for a slot
//!   within its handshake time, still counted as a pending handshake, and
//!   is closed if none frees.
//!
//! A connection's TLS stream carries its peer address and certificate chain
//! to tonic exactly as tonic's own TLS would (`TlsConnectInfo`), so caller
//! identity and audit peers are unchanged.
//!
//! An accept error of the listener (EMFILE, ENFILE, ENOBUFS…) is logged and
//! retried after a short pause rather than in a tight loop; one of a single
//! connection (aborted, reset) is skipped at once.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, error, warn};

/// How long to wait after a failed `accept` before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A handshake pending this long is taken to be stalled: the first to go
/// when the budget is full.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// What bounds the listener.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
}

/// The listening socket as a stream of authenticated TLS connections.
/// Dropping it stops accepting, closes the listening socket and abandons
/// the handshakes in progress.
pub struct Incoming {
    rx: mpsc::Receiver<TlsStream<Connection>>,
    accept: AbortHandle,
    pending: Arc<Pending>,
}

impl Incoming {
    /// Accepts on `listener`, handshaking with `tls` within `bounds`.
    pub fn new(listener: TcpListener, tls: Arc<ServerConfig>, bounds: Bounds) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let pending = Arc::new(Pending::new(bounds.max_handshakes));
        let slots = Arc::new(Semaphore::new(
            bounds.max_connections.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let accept = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            bounds,
            (slots, pending.clone()),
            tx,
        ))
        .abort_handle();
        Self {
            rx,
            accept,
            pending,
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept.abort();
        self.pending.abort_all();
    }
}

impl Stream for Incoming {
    type Item = io::Result<TlsStream<Connection>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(self.rx.poll_recv(cx));
        if next.is_none() {
            // The accept loop never returns: it ended only by panicking.
            error!("the listener stopped unexpectedly; no more connections are accepted");
        }
        Poll::Ready(next.map(Ok))
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: TlsAcceptor,
    bounds: Bounds,
    (slots, pending): (Arc<Semaphore>, Arc<Pending>),
    ready: mpsc::Sender<TlsStream<Connection>>,
) {
    loop {
        // Accept only while a connection could be served; the semaphore is
        // never closed, so this only waits.
        if let Ok(free) = slots.acquire().await {
            drop(free);
        }
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                warn!(error = %e, "accepting a connection failed; retrying shortly");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Small unary calls: Nagle's algorithm would only add latency.
        let _ = stream.set_nodelay(true);
        let (tls, slots, ready, done) =
            (tls.clone(), slots.clone(), ready.clone(), pending.clone());
        pending.start(Source::of(peer.ip()), |id| {
            tokio::spawn(async move {
                let conn = Connection {
                    stream,
                    _slot: None,
                };
                // The handshake, and (rarely: every slot was taken while it
                // shook hands) the wait for a free slot, within the
                // handshake time; still counted, and evictable, as pending.
                let admitted = tokio::time::timeout(bounds.handshake_timeout, async {
                    let tls = tls.accept(conn).await?;
                    let slot = slots.acquire_owned().await.map_err(io::Error::other)?;
                    Ok::<_, io::Error>((tls, slot))
                })
                .await;
                done.finish(id);
                match admitted {
                    Ok(Ok((mut tls, slot))) => {
                        tls.get_mut().0._slot = Some(slot);
                        let _ = ready.send(tls).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    Err(_) => debug!("TLS handshake (or the wait for a free slot) timed out"),
                }
            })
            .abort_handle()
        });
    }
}

/// Where a connection comes from, for sharing the handshake budget: an
/// IPv4 address, or the /64 prefix of an IPv6 one (a single host commonly
/// holds a whole /64). IPv4-mapped IPv6 addresses count as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !u128::from(u64::MAX);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// The handshakes in progress, oldest first, at most `max` of them.
struct Pending {
    max: usize,
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    /// By id, which is also the order they started in.
    tasks: BTreeMap<u64, (Source, Instant, AbortHandle)>,
    /// Pending handshakes per source; sources with none are removed.
    per_source: HashMap<Source, usize>,
    /// Set by `abort_all`: the listener is gone, start nothing more.
    closed: bool,
}

impl PendingInner {
    fn remove(&mut self, id: u64) -> Option<AbortHandle> {
        let (source, _, task) = self.tasks.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(task)
    }

    /// The handshake to close when a budget of `max` overflows (see the
    /// module documentation): the oldest if it is stalled, else the oldest
    /// of a source holding more than half the budget, else the oldest.
    fn victim(&self, max: usize, now: Instant) -> Option<u64> {
        let (&oldest, &(_, started, _)) = self.tasks.first_key_value()?;
        if now.saturating_duration_since(started) >= STALLED_AFTER {
            return Some(oldest);
        }
        let flooding = self
            .per_source
            .iter()
            .find(|&(_, &n)| n.saturating_mul(2) > max)
            .map(|(&source, _)| source);
        if let Some(flooding) = flooding {
            return self
                .tasks
                .iter()
                .find(|(_, (source, ..))| *source == flooding)
                .map(|(&id, _)| id);
        }
        Some(oldest)
    }
}

impl Pending {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: Mutex::default(),
        }
    }

    /// Starts a handshake task from `source` (under the lock, so it cannot
    /// finish before it is recorded) and, beyond the budget, closes the
    /// handshakes `PendingInner::victim` picks. Once closed, `spawn` is
    /// dropped uncalled, and the connection with it.
    fn start(&self, source: Source, spawn: impl FnOnce(u64) -> AbortHandle) {
        self.start_at(source, Instant::now(), spawn);
    }

    fn start_at(&self, source: Source, now: Instant, spawn: impl FnOnce(u64) -> AbortHandle) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.closed {
            return;
        }
        let id = inner.next;
        inner.next += 1;
        let task = spawn(id);
        inner.tasks.insert(id, (source, now, task));
        *inner.per_source.entry(source).or_insert(0) += 1;
        while inner.tasks.len() > self.max {
            let Some(victim) = inner.victim(self.max, now) else {
                break;
            };
            if let Some(task) = inner.remove(victim) {
                debug!("handshake budget full: closing a pending handshake");
                task.abort();
            }
        }
    }

    fn finish(&self, id: u64) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    fn abort_all(&self) {
        let tasks = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.closed = true;
            inner.per_source.clear();
            std::mem::take(&mut inner.tasks)
        };
        for (_, _, task) in tasks.into_values() {
            task.abort();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .len()
    }
}

/// Errors of one connection rather than of the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// An accepted TCP connection and, once its handshake authenticated the
/// client, the connection slot it holds until dropped.
pub struct Connection {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    /// The same information a bare `TcpStream` gives, so the peer address
    /// recorded in audit entries is unchanged.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Beyond the budget the oldest handshakes are aborted, newest kept;
    /// finished ones leave the set.
    #[tokio::test]
    async fn a_full_handshake_budget_evicts_the_oldest() {
        let pending = Pending::new(2);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            pending.start(LOCAL, |_| {
                let t = tokio::spawn(std::future::pending::<()>());
                let h = t.abort_handle();
                tasks.push(t);
                h
            });
        }
        assert_eq!(pending.len(), 2);
        let first = tasks.remove(0);
        assert!(
            first.await.unwrap_err().is_cancelled(),
            "the oldest was kept"
        );
        assert!(!tasks[0].is_finished() && !tasks[1].is_finished());
        // A finished handshake leaves the set; abort_all stops the rest.
        pending.finish(1);
        assert_eq!(pending.len(), 1);
        pending.abort_all();
        assert_eq!(pending.len(), 0);
        let (second, third) = (tasks.remove(0), tasks.remove(0));
        assert!(third.await.unwrap_err().is_cancelled());
        assert!(!second.is_finished(), "a finished handshake was aborted");
        second.abort();
    }

    const LOCAL: Source = Source(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn source(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    /// Starts a never-ending handshake task from `from`, `secs` seconds
    /// after `t0`.
    fn stall(
        pending: &Pending,
        from: Source,
        t0: Instant,
        secs: u64,
    ) -> tokio::task::JoinHandle<()> {
        let mut task = None;
        pending.start_at(from, t0 + Duration::from_secs(secs), |_| {
            let t = tokio::spawn(std::future::pending::<()>());
            let h = t.abort_handle();
            task = Some(t);
            h
        });
        task.unwrap()
    }

    /// Whether `t` was aborted (waiting a few seconds at most, so a
    /// handshake wrongly kept fails the test instead of hanging it).
    async fn closed(t: tokio::task::JoinHandle<()>) -> bool {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(res) => res.unwrap_err().is_cancelled(),
            Err(_) => false,
        }
    }

    /// A flood from one source closes only its own handshakes, oldest
    /// first, however early the others started.
    #[tokio::test]
    async fn a_flood_from_one_source_closes_only_its_own() {
        let (pending, t0) = (Pending::new(3), Instant::now());
        let early = stall(&pending, source("10.0.0.1"), t0, 0);
        let flood: Vec<_> = (0..6)
            .map(|_| stall(&pending, source("10.0.0.66"), t0, 0))
            .collect();
        assert_eq!(pending.len(), 3);
        // An aborted task is marked finished only once the runtime polls
        // it: let it run first, or the check below could not fail.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !early.is_finished(),
            "another source's handshake was closed"
        );
        let mut flood = flood.into_iter();
        for _ in 0..4 {
            assert!(closed(flood.next().unwrap()).await, "not oldest first");
        }
        let rest: Vec<_> = flood.collect();
        assert!(rest.iter().all(|t| !t.is_finished()));
        pending.abort_all();
        for t in rest.into_iter().chain([early]) {
            assert!(closed(t).await);
        }
    }

    /// Stalled handshakes spread over many sources are closed first, even
    /// while one busy source (a NAT gateway, say) is the only one shaking
    /// hands now; once they are gone, the busy source above half the
    /// budget gives up its own oldest.
    #[tokio::test]
    async fn stalled_handshakes_go_first_whatever_their_source() {
        let (pending, t0) = (Pending::new(4), Instant::now());
        let stalled: Vec<_> = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
            .into_iter()
            .map(|s| stall(&pending, source(s), t0, 0))
            .collect();
        let nat = source("10.0.0.1");
        let mut callers: Vec<_> = (0..4).map(|_| stall(&pending, nat, t0, 5)).collect();
        for t in stalled {
            assert!(closed(t).await, "a stalled handshake outlived a caller's");
        }
        assert!(callers.iter().all(|t| !t.is_finished()));
        // Four young handshakes, all from the NAT: the next closes its oldest.
        callers.push(stall(&pending, nat, t0, 5));
        assert!(closed(callers.remove(0)).await);
        assert!(callers.iter().all(|t| !t.is_finished()));
        pending.abort_all();
    }

    /// Young handshakes from many sources, none holding more than half the
    /// budget: the oldest goes, as before sources were counted.
    #[tokio::test]
    async fn a_spread_of_young_handshakes_loses_the_oldest() {
        let (pending, t0) = (Pending::new(4), Instant::now());
        let mut all: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            .into_iter()
            .map(|s| stall(&pending, source(s), t0, 0))
            .collect();
        assert!(closed(all.remove(0)).await);
        assert!(all.iter().all(|t| !t.is_finished()));
        pending.abort_all();
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_prefixes() {
        assert_eq!(source("192.0.2.7"), source("::ffff:192.0.2.7"));
        assert_ne!(source("192.0.2.7"), source("192.0.2.8"));
        assert_eq!(source("2001:db8:1:2::1"), source("2001:db8:1:2:ffff::9"));
        assert_eq!(source("2001:db8:1:2::1"), source("2001:db8:1:2::"));
        assert_ne!(source("2001:db8:1:2::1"), source("2001:db8:1:3::1"));
    }
}
