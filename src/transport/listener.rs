//! Accepting connections: mutual TLS, with bounded handshakes and a bounded
//! number of connections.
//!
//! The vault runs the TLS handshake itself (rather than leaving it to
//! tonic) so that the two kinds of connection get separate budgets:
//!
//! - **Handshakes** (no one authenticated yet): at most
//!   `limits.max_handshakes` at once, each closed after
//!   `limits.handshake_timeout_ms`. When the budget is full, a new
//!   connection evicts the *oldest* pending handshake. A real client
//!   finishes its handshake in milliseconds, so a flood of bare or stalled
//!   connections cannot keep callers out unless it opens `max_handshakes`
//!   new connections within one handshake's time.
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

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

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
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
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
        pending.start(|id| {
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

/// The handshakes in progress, oldest first, at most `max` of them.
struct Pending {
    max: usize,
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    tasks: BTreeMap<u64, AbortHandle>,
    /// Set by `abort_all`: the listener is gone, start nothing more.
    closed: bool,
}

impl Pending {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: Mutex::default(),
        }
    }

    /// Starts a handshake task (under the lock, so it cannot finish before
    /// it is recorded) and evicts the oldest ones beyond the budget. Once
    /// closed, `spawn` is dropped uncalled, and the connection with it.
    fn start(&self, spawn: impl FnOnce(u64) -> AbortHandle) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.closed {
            return;
        }
        let id = inner.next;
        inner.next += 1;
        let task = spawn(id);
        inner.tasks.insert(id, task);
        while inner.tasks.len() > self.max {
            if let Some((_, oldest)) = inner.tasks.pop_first() {
                debug!("handshake budget full: closing the oldest pending handshake");
                oldest.abort();
            }
        }
    }

    fn finish(&self, id: u64) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .remove(&id);
    }

    fn abort_all(&self) {
        let tasks = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.closed = true;
            std::mem::take(&mut inner.tasks)
        };
        for task in tasks.into_values() {
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
            pending.start(|_| {
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
}
