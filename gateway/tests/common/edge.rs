//! The edge as clients meet it: nginx rendered from the shipped `deploy/nginx/nginx.conf`
//! (exactly as `deploy/local/cluster.sh` renders it) with a self-signed certificate from
//! `deploy/nginx/self-signed-cert.sh`, and HTTPS and WSS clients that trust that certificate
//! and nothing else; and the helpers that run the shipped scripts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::{HttpReply, PATIENCE, Process, TempDir, free_port, parse_reply, temp_dir, wait_until};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the gateway crate lives in the workspace root")
        .to_path_buf()
}

/// A finished command's status and output, for a failure message.
pub fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `command` (for `what`) and fails the test, with its output, unless it succeeds.
fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        describe(&output)
    );
    output
}

/// `PATH` plus the sbin directories: Debian installs nginx in /usr/sbin, which a non-root
/// user's `PATH` often lacks.
pub fn search_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin")
}

/// A TLS client configuration that trusts only the certificate(s) in the PEM file `ca`.
pub fn trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).expect("read the certificate file") {
        roots
            .add(certificate.expect("a PEM certificate"))
            .expect("a usable certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// `GET path` over HTTPS to 127.0.0.1:`port`, verifying the server with `tls`; `None` if the
/// connection or the TLS handshake failed.
pub fn https_get(port: u16, path: &str, tls: &Arc<rustls::ClientConfig>) -> Option<HttpReply> {
    let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
    let connection = rustls::ClientConnection::new(tls.clone(), name).ok()?;
    let socket = TcpStream::connect(("127.0.0.1", port)).ok()?;
    socket.set_read_timeout(Some(PATIENCE)).ok()?;
    request(rustls::StreamOwned::new(connection, socket), port, path)
}

/// `GET path` over plain HTTP, with the whole reply (headers included).
pub fn http_get_reply(port: u16, path: &str) -> Option<HttpReply> {
    let socket = TcpStream::connect(("127.0.0.1", port)).ok()?;
    socket.set_read_timeout(Some(PATIENCE)).ok()?;
    request(socket, port, path)
}

fn request(mut stream: impl Read + Write, port: u16, path: &str) -> Option<HttpReply> {
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
            // A server that closes without TLS's close_notify has still sent everything.
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(_) => return None,
        }
    }
    parse_reply(&raw)
}

/// Makes a self-signed certificate for 127.0.0.1 in `dir` with the shipped script; returns
/// the certificate's path (the key is beside it).
pub fn self_signed_certificate(dir: &Path) -> PathBuf {
    run(
        Command::new("sh")
            .arg(repo_root().join("deploy/nginx/self-signed-cert.sh"))
            .arg(dir)
            .args(["localhost", "127.0.0.1"]),
        "deploy/nginx/self-signed-cert.sh",
    );
    dir.join("tls.crt")
}

/// nginx in front of gateway nodes, from the shipped configuration; stopped when dropped.
pub struct Nginx {
    /// The public TLS entry.
    pub https_port: u16,
    /// Plain HTTP, redirecting to `https_port`.
    pub http_port: u16,
    /// The internal listener.
    pub internal_port: u16,
    /// The certificate clients must trust.
    pub certificate: PathBuf,
    process: Process,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx with the nodes' public ports and internal ports as its two upstreams.
    pub fn start(nodes: &[u16], internal_nodes: &[u16]) -> Nginx {
        let dir = temp_dir("nginx");
        let certificate = self_signed_certificate(&dir.path().join("tls"));
        let (https_port, http_port, internal_port) = (free_port(), free_port(), free_port());
        let addresses = |ports: &[u16]| -> String {
            let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            list.join(" ")
        };
        let config = dir.path().join("nginx.conf");
        std::fs::create_dir_all(dir.path().join("temp")).expect("nginx's temp dir");
        // render_nginx is a shell function: source it, then call it with the arguments.
        run(
            Command::new("bash")
                .arg("-c")
                .arg(r#"source "$1" && shift && render_nginx "$@""#)
                .arg("render")
                .arg(repo_root().join("deploy/local/render.sh"))
                .arg(repo_root().join("deploy/nginx/nginx.conf"))
                .arg(&config)
                .arg(format!("https=127.0.0.1:{https_port}"))
                .arg(format!("http=127.0.0.1:{http_port}"))
                .arg(format!("internal=127.0.0.1:{internal_port}"))
                .arg(format!("redirect_port={https_port}"))
                .arg(format!("cert={}", certificate.display()))
                .arg(format!("key={}", dir.path().join("tls/tls.key").display()))
                .arg(format!("temp={}", dir.path().join("temp").display()))
                .arg(format!("servers={}", addresses(nodes)))
                .arg(format!("internal_servers={}", addresses(internal_nodes))),
            "render_nginx",
        );
        let log = std::fs::File::create(dir.path().join("nginx.log")).expect("nginx's log");
        // One process (no master and workers), so killing it on drop leaves nothing behind.
        let process = Process::spawn(
            "nginx",
            Command::new("nginx")
                .env("PATH", search_path())
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&config)
                .args(["-e", "stderr", "-g"])
                .arg(format!(
                    "daemon off; master_process off; pid {};",
                    dir.path().join("nginx.pid").display()
                ))
                .stdout(Stdio::null())
                .stderr(log),
        );
        let nginx = Nginx {
            https_port,
            http_port,
            internal_port,
            certificate,
            process,
            dir,
        };
        wait_until("nginx to answer on its internal listener", || {
            std::net::TcpStream::connect(("127.0.0.1", nginx.internal_port)).is_ok()
        });
        nginx
    }

    /// A TLS configuration that trusts this nginx's certificate.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        trusting(&self.certificate)
    }

    /// The public WebSocket URL for `path_and_query` (e.g. "/ws?room=a").
    pub fn wss_url(&self, path_and_query: &str) -> String {
        format!("wss://127.0.0.1:{}{path_and_query}", self.https_port)
    }

    /// nginx's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nginx.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- nginx (https {}) log ---\n{}",
                self.https_port,
                self.log()
            );
        }
        // The process itself is killed when `process` drops.
    }
}
