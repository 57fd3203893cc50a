//! The accept loop: HTTP/1.1 with upgrades, the peer address on every request, and a deadline
//! for the request head.
//!
//! `axum::serve` has no header-read timeout, so a client that opens TCP connections and never
//! finishes its HTTP request (slowloris) would hold a socket and a task each for as long as it
//! likes. Here every connection is served by hyper's HTTP/1 builder with `header_read_timeout`:
//! a request head not complete within the handshake timeout drops the connection, and so does
//! an idle keep-alive connection that starts no new request within it. Upgraded WebSockets are
//! handed off and no longer subject to it.
//!
//! Every request also carries a [`ConnectionAbort`]: a response that can never finish (an SSE
//! stream whose reader stopped reading) uses it to close its connection from under hyper.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::Instrument;

/// Connections the kernel may hold completed but not yet accepted (it caps this at
/// `net.core.somaxconn`). A reconnect storm after a node restart arrives faster than any
/// accept loop; a short queue drops SYNs, and each dropped one costs its client a one-second
/// retransmission.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds the listening socket with a backlog sized for reconnect storms.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted node can bind while its predecessor's connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown`, then lets HTTP requests in flight finish.
/// Requests carry `ConnectInfo<SocketAddr>` with the TCP peer.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Chat frames are small and latency-bound: Nagle's algorithm would hold each one back
        // until the previous one is acknowledged, which the client may delay by up to 40 ms.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not disable Nagle's algorithm");
        }
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(
            serve_connection(stream, peer, router, handshake_timeout, shutdown).in_current_span(),
        );
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Closes the HTTP connection a request came on, whatever hyper is doing with it.
#[derive(Debug, Clone)]
pub struct ConnectionAbort(CancellationToken);

impl ConnectionAbort {
    /// Drops the connection: a response still being written is cut off.
    pub fn abort(&self) {
        self.0.cancel();
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let abort = CancellationToken::new();
    let handle = ConnectionAbort(abort.clone());
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(handle.clone());
        router.clone().oneshot(request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "http connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection => {}
                _ = abort.cancelled() => {}
            }
        }
        _ = abort.cancelled() => {}
    }
}

/// Errors on one connection (reset before accept) are harmless; others (out of file
/// descriptors) are logged and slowed down so the loop does not spin.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept failed; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
