//! Accepting connections: at most `limits.max_connections` open at once.
//!
//! Each accepted socket holds one slot until it closes. When every slot is
//! taken the vault stops accepting, so new connections wait in the kernel's
//! backlog (and time out there) instead of each costing a task, a TLS
//! handshake and buffers: a flood of connections cannot exhaust the
//! vault's memory or file descriptors. Slots held by unauthenticated
//! sockets are freed by the handshake timeout; the rest belong to callers
//! with a client certificate from the configured CA.
//!
//! An accept error of the listener (EMFILE, ENFILE, ENOBUFS…) is logged and
//! retried after a short pause rather than in a tight loop; one of a single
//! connection (aborted, reset) is skipped at once.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// How long to wait after a failed `accept` before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The listening socket as a stream of connections, each holding a slot.
pub struct Incoming {
    listener: TcpListener,
    slots: PollSemaphore,
    slot: Option<OwnedSemaphorePermit>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    /// Serves at most `max_connections` (at least 1) connections at once.
    pub fn new(listener: TcpListener, max_connections: usize) -> Self {
        Self {
            listener,
            slots: PollSemaphore::new(Arc::new(Semaphore::new(max_connections.max(1)))),
            slot: None,
            retry: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(retry) = &mut this.retry {
            ready!(retry.as_mut().poll(cx));
            this.retry = None;
        }
        if this.slot.is_none() {
            // The semaphore is never closed, so `None` cannot happen; end
            // the stream rather than spin if it somehow did.
            let Some(slot) = ready!(this.slots.poll_acquire(cx)) else {
                return Poll::Ready(None);
            };
            this.slot = Some(slot);
        }
        match ready!(this.listener.poll_accept(cx)) {
            Ok((stream, _)) => {
                // Small unary calls: Nagle's algorithm would only add latency.
                let _ = stream.set_nodelay(true);
                let slot = this.slot.take();
                Poll::Ready(Some(Ok(Connection {
                    stream,
                    _slot: slot,
                })))
            }
            // A connection that went away before it was accepted: nothing
            // is wrong with the listener, so accept the next one at once.
            Err(e) if is_per_connection(&e) => Poll::Ready(Some(Err(e))),
            Err(e) => {
                warn!(error = %e, "accepting a connection failed; retrying shortly");
                this.retry = Some(Box::pin(tokio::time::sleep(ACCEPT_RETRY)));
                Poll::Ready(Some(Err(e)))
            }
        }
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

/// An accepted TCP connection and the slot it holds until dropped.
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
    use tokio_stream::StreamExt;

    /// The second connection is accepted only once the first is dropped.
    #[tokio::test]
    async fn a_full_listener_accepts_again_when_a_connection_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, 1);
        let c1 = TcpStream::connect(addr).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            first.connect_info().remote_addr(),
            Some(c1.local_addr().unwrap())
        );
        let c2 = TcpStream::connect(addr).await.unwrap();
        // With the only slot taken, the stream does not accept c2.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut incoming).poll_next(&mut cx).is_pending());
        drop(first);
        let second = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            second.connect_info().remote_addr(),
            Some(c2.local_addr().unwrap())
        );
    }
}
