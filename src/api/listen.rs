//! The client API's listener: one TCP port (TLS when configured) speaking HTTP/1.1 and HTTP/2
//! (gRPC, the HTTP API), with HTTP/1.1 upgrades, which the live binding's WebSocket
//! (`/socksync`, [`super::live`]) needs. Each request carries its connection's remote address
//! as axum's [`ConnectInfo`], which the access check reads (a loopback caller).
//!
//! tonic's own server cannot upgrade a connection, so the node serves its routes here with
//! hyper-util: accept, TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`], off the accept loop),
//! then one connection task; on shutdown every connection is told to finish gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1.1 client has to send a request's head, and any client its first bytes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long open requests may take to finish once the node stops.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Bytes that tell HTTP/1.1 from HTTP/2: the length of the HTTP/2 connection preface.
const PREFACE_BYTES: usize = 24;

/// An accepted connection whose first [`PREFACE_BYTES`] must arrive by a deadline: hyper-util
/// reads them to tell HTTP/1.1 from HTTP/2 and has no deadline of its own, so a client that
/// connects and sends nothing (or half a preface) would hold its connection forever.
struct FirstBytes<IO> {
    io: IO,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    needed: usize,
}

impl<IO> FirstBytes<IO> {
    fn new(io: IO) -> FirstBytes<IO> {
        FirstBytes {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(HEADER_TIMEOUT))),
            needed: PREFACE_BYTES,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstBytes<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                self.needed = self.needed.saturating_sub(read);
                if self.needed == 0 || read == 0 {
                    self.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request in time",
                    )));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstBytes<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The client API's TLS identity from PEM files (certificate chain, private key), offering
/// HTTP/2 and HTTP/1.1 by ALPN. The error names the file and what is wrong with it.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{}: {error}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|error| format!("{}: {error}", key.display()))?
        .ok_or_else(|| format!("{} holds no PEM private key", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|error| {
            format!(
                "{} and {} do not make a TLS identity: {error}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `stop` completes, then lets open connections finish
/// (callers bound how long with their own grace period).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    // Connections still in their TLS handshake are not hyper's yet: this ends them at shutdown.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = Builder::new(TokioExecutor::new());
    // A client that sends no complete request head in time is dropped (slowloris), and an idle
    // HTTP/2 connection (gRPC) is pinged so a dead peer does not hold it forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    tokio::pin!(stop);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(%error, "accepting a client API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Small answers (an append's reply, a live frame) go out at once; a peer that vanished
        // without a word is noticed by the kernel's keepalive probes.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(15));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let router = router.clone();
        let service = tower::service_fn(move |mut request: axum::extract::Request| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(remote));
            use tower::ServiceExt;
            router.clone().oneshot(request)
        });
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            service,
            |request: hyper::Request<hyper::body::Incoming>| request.map(axum::body::Body::new),
        ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let mut stopped = stopped.clone();
        // Forget connections that ended (the set holds each until it is joined).
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let served = match tls {
                None => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(FirstBytes::new(tcp)), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(tls) => {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp));
                    let stream = tokio::select! {
                        shaken = handshake => match shaken {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%remote, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        },
                        _ = stopped.wait_for(|stopped| *stopped) => return,
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(
                            TokioIo::new(FirstBytes::new(stream)),
                            service,
                        )
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%remote, %error, "client API connection ended");
            }
        });
    }
    let _ = stopping.send(true);
    // Requests in flight get a grace period to finish; then every connection is cut (a client
    // that sent half a request head must not hold the node open).
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}
