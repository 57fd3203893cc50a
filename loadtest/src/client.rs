//! One WebSocket client connection: TCP connect (optionally from a chosen 127.0.0.x source
//! address, to spread ephemeral ports), the WebSocket handshake, the protocol's own handshake up
//! to the server's `userId` frame, then text frames in and out. Failures are reduced to short
//! labels (`timeout`, `refused`, `http_503`, `close_4000`, …) for the reports.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::{TcpSocket, TcpStream};
use url::Url;

use crate::protocol::{Incoming, Protocol};
use crate::ws::{WsError, WsStream};

/// Where and how clients connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub protocol: Protocol,
    pub urls: Vec<Url>,
    addrs: Vec<SocketAddr>,
    /// Number of 127.0.0.x source addresses to spread clients over (0: let the kernel choose).
    pub source_ips: u8,
    pub connect_timeout: Duration,
    /// Display name sent as `name=<prefix><index>`, if any.
    pub name_prefix: Option<String>,
}

impl Target {
    /// Check the URLs and resolve their hosts once, up front.
    pub async fn resolve(
        protocol: Protocol,
        urls: &[String],
        source_ips: u8,
        connect_timeout: Duration,
        name_prefix: Option<String>,
    ) -> Result<Target> {
        if urls.is_empty() {
            bail!("at least one --url is needed");
        }
        let mut parsed = Vec::new();
        let mut addrs = Vec::new();
        for u in urls {
            let url = Url::parse(u).with_context(|| format!("invalid URL {u:?}"))?;
            if url.scheme() != "ws" {
                bail!("{u}: only ws:// URLs are supported");
            }
            let host = url.host_str().context("URL without host")?.to_string();
            let port = url.port_or_known_default().unwrap_or(80);
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .find(SocketAddr::is_ipv4)
                .with_context(|| format!("{host} has no IPv4 address"))?;
            if source_ips > 0 && !addr.ip().is_loopback() {
                bail!("--source-ips binds to 127.0.0.x and only works with loopback targets");
            }
            parsed.push(url);
            addrs.push(addr);
        }
        Ok(Target {
            protocol,
            urls: parsed,
            addrs,
            source_ips,
            connect_timeout,
            name_prefix,
        })
    }

    /// Source address of client `index`: 127.0.0.2, 127.0.0.3, … round-robin.
    pub fn source_ip(&self, index: usize) -> Option<Ipv4Addr> {
        (self.source_ips > 0).then(|| {
            let host = 2 + (index % self.source_ips as usize) as u8;
            Ipv4Addr::new(127, 0, 0, host)
        })
    }
}

/// Which URL and room one client uses.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub index: usize,
    pub url_index: usize,
    pub room: String,
}

/// An open client session that has received its `userId` frame.
pub struct Session {
    ws: WsStream,
    protocol: Protocol,
    /// Node name the server reported, if any.
    pub node: Option<String>,
    /// Time from starting the TCP connect to the `userId` frame.
    pub setup: Duration,
}

/// Why a session ended or could not start, as a report label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended(pub String);

fn io_label(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "broken_pipe".into(),
        Some(libc::EADDRNOTAVAIL) => "no_source_port".into(),
        Some(libc::EADDRINUSE) => "address_in_use".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files".into(),
        Some(libc::ETIMEDOUT) => "tcp_timeout".into(),
        _ => match e.kind() {
            io::ErrorKind::UnexpectedEof => "eof".into(),
            io::ErrorKind::ConnectionReset => "reset".into(),
            k => format!("io_{k:?}").to_lowercase(),
        },
    }
}

/// The labels tokio-tungstenite's errors used to get, so reports stay comparable.
fn ws_label(e: &WsError) -> String {
    match e {
        WsError::Io(io) => io_label(io),
        WsError::Http(status) => format!("http_{status}"),
        WsError::Closed(Some(code)) => format!("close_{code}"),
        WsError::Closed(None) => "close_no_code".into(),
        WsError::Reset => "reset".into(),
        WsError::Protocol(_) => "ws_protocol_error".into(),
        WsError::TooLarge => "frame_too_large".into(),
        WsError::Utf8 => "ws_error".into(),
    }
}

#[allow(unsafe_code)]
async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        // Let connect() pick the port for this (source, destination) pair instead of bind():
        // a bound port would be reserved for every destination and exhaust the range sooner.
        let one: libc::c_int = 1;
        // SAFETY: plain setsockopt on a socket we own, with a correctly sized int option.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Session {
    /// Connect client `spec` and wait for its `userId` frame, all within the target's connect
    /// timeout.
    pub async fn open(target: &Target, spec: &ClientSpec) -> Result<Session, Ended> {
        let started = Instant::now();
        let fut = Self::open_inner(target, spec, started);
        match tokio::time::timeout(target.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Ended("timeout".into())),
        }
    }

    async fn open_inner(
        target: &Target,
        spec: &ClientSpec,
        started: Instant,
    ) -> Result<Session, Ended> {
        let base = &target.urls[spec.url_index];
        let name = target
            .name_prefix
            .as_ref()
            .map(|p| format!("{p}{}", spec.index));
        let url = target
            .protocol
            .client_url(base, &spec.room, name.as_deref());
        let stream = tcp_connect(target.addrs[spec.url_index], target.source_ip(spec.index))
            .await
            .map_err(|e| Ended(io_label(&e)))?;
        let ws = WsStream::connect(stream, &url)
            .await
            .map_err(|e| Ended(ws_label(&e)))?;
        let mut session = Session {
            ws,
            protocol: target.protocol,
            node: None,
            setup: Duration::ZERO,
        };
        loop {
            let text = session.recv_text().await?;
            let reply = match target.protocol.decode(text) {
                Ok(Incoming::Ready { node }) => {
                    session.node = node;
                    session.setup = started.elapsed();
                    return Ok(session);
                }
                Ok(Incoming::Reply(r)) => r,
                Ok(Incoming::Error { code }) => return Err(Ended(format!("server_error_{code}"))),
                Ok(Incoming::Closed) => return Err(Ended("closed_before_ready".into())),
                Ok(_) => continue,
                Err(_) => return Err(Ended("bad_frame_before_ready".into())),
            };
            session.send_text(&reply).await?;
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The next text frame, lent until the next call. Pings are answered by the WebSocket
    /// layer; binary frames are skipped. A close frame or a broken connection ends the session.
    pub async fn recv_text(&mut self) -> Result<&str, Ended> {
        self.ws.recv_text().await.map_err(|e| Ended(ws_label(&e)))
    }

    /// The next text frame if one is already buffered (see [`WsStream::try_recv_text`]).
    pub fn try_recv_text(&mut self) -> Option<Result<&str, Ended>> {
        self.ws
            .try_recv_text()
            .map(|r| r.map_err(|e| Ended(ws_label(&e))))
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), Ended> {
        self.ws
            .send_text(text)
            .await
            .map_err(|e| Ended(ws_label(&e)))
    }

    /// Close politely: send a close frame and wait (bounded) for the server's.
    pub async fn close(mut self, wait: Duration) {
        if self.ws.send_close().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, self.ws.drain_until_closed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn source_addresses_rotate_over_loopback() {
        let t = Target::resolve(
            Protocol::Gateway,
            &["ws://127.0.0.1:1/ws".to_string()],
            3,
            Duration::from_secs(1),
            None,
        )
        .await
        .unwrap();
        assert_eq!(t.source_ip(0), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(t.source_ip(2), Some(Ipv4Addr::new(127, 0, 0, 4)));
        assert_eq!(t.source_ip(3), Some(Ipv4Addr::new(127, 0, 0, 2)));
    }

    #[tokio::test]
    async fn refused_connections_get_a_label() {
        // Bind then drop a listener to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Target::resolve(
            Protocol::Gateway,
            &[format!("ws://127.0.0.1:{port}/ws")],
            2,
            Duration::from_secs(2),
            None,
        )
        .await
        .unwrap();
        let spec = ClientSpec {
            index: 0,
            url_index: 0,
            room: "r".into(),
        };
        let err = Session::open(&t, &spec).await.err().unwrap();
        assert_eq!(err, Ended("refused".into()));
    }

    #[tokio::test]
    async fn wss_and_non_loopback_source_binding_are_refused() {
        let d = Duration::from_secs(1);
        assert!(
            Target::resolve(Protocol::Gateway, &["wss://127.0.0.1/".into()], 0, d, None)
                .await
                .is_err()
        );
        assert!(
            Target::resolve(Protocol::Gateway, &["ws://192.0.2.1/".into()], 2, d, None)
                .await
                .is_err()
        );
    }
}
