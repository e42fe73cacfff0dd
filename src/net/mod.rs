//! The node's two listeners: the client API's (one TCP port, TLS when configured, speaking
//! HTTP/1.1 and HTTP/2 — gRPC, the HTTP API — with HTTP/1.1 upgrades, which the live binding's
//! WebSocket (`/socksync`, the live binding) needs) and the peer listener's (HTTP/2 only:
//! replication's one gRPC call). Each request carries its connection's remote address as axum's
//! [`ConnectInfo`] and tonic's [`TcpConnectInfo`], which the access check (a loopback caller)
//! and the peer service read.
//!
//! tonic's own server cannot upgrade a connection, nor cap connections, so the node serves its
//! routes here with hyper-util: accept (within [`ConnectionLimits`]: in all and per address),
//! TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`], off the accept loop), then one connection
//! task; on shutdown every connection is told to finish gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
use tonic::transport::server::TcpConnectInfo;

pub mod tls;
pub use tls::{tls_acceptor, ChannelBinding, PeerTls};

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1.1 client has to send a request's head, and any client its first bytes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long open requests may take to finish once the node stops.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Bytes that tell HTTP/1.1 from HTTP/2: the length of the HTTP/2 connection preface.
const PREFACE_BYTES: usize = 24;

/// How many connections a listener holds at once, and what each may do. A connection past a cap
/// is closed as soon as it is accepted (the client API's first writes it a `429` saying which
/// cap), so an attacker's connections cost the node no memory and no file descriptors beyond the
/// caps, whatever keys or names it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one address (an IPv6 address counts by its /64 prefix,
    /// which one host usually holds whole).
    pub max_per_address: usize,
    /// Concurrent HTTP/2 streams (gRPC calls) on one connection.
    pub max_h2_streams: u32,
    /// Serve HTTP/1.1 too (the client API), or only HTTP/2 (the peer listener).
    pub http1: bool,
    /// Bytes a connection may send before the service marks it [`Proven`] (the peer listener:
    /// until the peer proved its node key), within [`UNPROVEN_TIMEOUT`] of its accept; `None`: no
    /// such budget.
    pub unproven_bytes: Option<usize>,
}

impl ConnectionLimits {
    /// These limits with at most `connections` in all (the listener's share of the node's file
    /// descriptors) and at most a quarter of them from one address, so one address cannot fill
    /// the listener alone.
    pub fn within(self, connections: usize) -> ConnectionLimits {
        let max_connections = self.max_connections.min(connections);
        ConnectionLimits {
            max_connections,
            max_per_address: self.max_per_address.min((max_connections / 4).max(1)),
            ..self
        }
    }

    /// The client API's caps: browsers and clients open several connections each, and the live
    /// binding holds one per open page.
    pub const API: ConnectionLimits = ConnectionLimits {
        max_connections: 4096,
        max_per_address: 1024,
        max_h2_streams: 256,
        http1: true,
        unproven_bytes: None,
    };

    /// The peer listener's caps: an honest peer holds one connection with one call; until it
    /// proved its key (a `Hello` and a `Proof`, a few hundred bytes) it may send at most
    /// [`UNPROVEN_PEER_BYTES`].
    pub const PEER: ConnectionLimits = ConnectionLimits {
        max_connections: 256,
        max_per_address: 8,
        max_h2_streams: 1,
        http1: false,
        unproven_bytes: Some(UNPROVEN_PEER_BYTES),
    };
}

/// How long a peer connection may stay open without proving its key (the replication call's own
/// handshake deadline is 10 s from the call's start).
pub const UNPROVEN_TIMEOUT: Duration = Duration::from_secs(15);

fn unproven_timeout() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "did not prove its key in time",
    )
}

/// What a peer may send before it proved its key: its handshake, and what HTTP/2 lets it send
/// ahead of it (one stream's window, which this listener sets to 1 MiB) before the proof is
/// read.
pub const UNPROVEN_PEER_BYTES: usize = 2 << 20;

/// Largest peer message, derived from the largest scribe any policy allows: a replication batch
/// is cut at 4 MiB unless its one scribe is larger, up to an envelope and a payload at
/// [`crate::scribe::HARD_MAX_PAYLOAD_BYTES`]; 1 MiB more covers each scribe's seal, ids and
/// framing. A peer that declares a larger message is cut off before it is read.
pub const MAX_PEER_MESSAGE_BYTES: usize =
    crate::scribe::HARD_MAX_PAYLOAD_BYTES as usize + crate::scribe::MAX_ENVELOPE_BYTES + (1 << 20);

/// Bytes of unfinished messages all peer connections together may hold (read by the node, not yet
/// a whole message): four of the largest messages a peer may send.
pub const PEER_PENDING_BYTES: usize = 4 * PEER_PENDING_PER_ADDRESS;
/// Bytes of unfinished messages the peer connections of one address may hold: one of the largest
/// messages a peer may send ([`MAX_PEER_MESSAGE_BYTES`]), so one always goes through.
pub const PEER_PENDING_PER_ADDRESS: usize = MAX_PEER_MESSAGE_BYTES;
/// How long a peer has to finish a message once it has begun it.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer connection whose key is proven may stay open with no call (an honest peer
/// keeps its one replication call open; when the call ends it dials anew).
pub const IDLE_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Set by the service once a connection's peer is known (the peer listener: it proved its node
/// key); until then the connection's reads count against [`ConnectionLimits::unproven_bytes`].
/// It also counts the bytes of the message the connection is receiving (see [`PendingBytes`]).
#[derive(Clone, Debug)]
pub struct Proven(Arc<ProvenState>);

#[derive(Debug)]
struct ProvenState {
    flag: AtomicBool,
    /// Bytes of this connection's call body read since its last whole message.
    held: AtomicUsize,
    /// Calls open on the connection now.
    calls: AtomicUsize,
    /// Woken when the last call ends, so the connection starts its idle deadline.
    idle_waker: Mutex<Option<std::task::Waker>>,
    pending: Arc<PendingBytes>,
    address: IpAddr,
}

impl Proven {
    fn new(pending: Arc<PendingBytes>, address: IpAddr) -> Proven {
        Proven(Arc::new(ProvenState {
            flag: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            idle_waker: Mutex::new(None),
            pending,
            address,
        }))
    }

    /// The connection's peer is known: its reads no longer count.
    pub fn set(&self) {
        self.0.flag.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    /// The call received a whole message: the bytes it held for it are given back.
    pub fn message_received(&self) {
        let held = self.0.held.swap(0, Ordering::AcqRel);
        self.0.pending.give_back(self.0.address, held);
    }

    fn holds(&self) -> bool {
        self.0.held.load(Ordering::Acquire) > 0
    }

    /// Whether the connection's key is proven and it has no call open; `cx` is woken when its
    /// last call ends.
    fn idle(&self, cx: &Context<'_>) -> bool {
        *self.0.idle_waker.lock().expect("idle waker lock") = Some(cx.waker().clone());
        self.is_set() && self.0.calls.load(Ordering::Acquire) == 0
    }

    fn took(&self, bytes: usize) {
        self.0.held.fetch_add(bytes, Ordering::AcqRel);
        self.0.pending.take(self.0.address, bytes);
    }
}

impl Drop for ProvenState {
    fn drop(&mut self) {
        let held = std::mem::take(self.held.get_mut());
        self.pending.give_back(self.address, held);
    }
}

/// The bytes of unfinished messages the peer listener's connections hold, in all and per address:
/// a connection in the middle of a message reads on only while both are under their caps
/// ([`PEER_PENDING_BYTES`], [`PEER_PENDING_PER_ADDRESS`]); otherwise it waits (its peer is held
/// back by HTTP/2 flow control) until another connection finishes a message or is cut — and every
/// message must be finished within [`MESSAGE_TIMEOUT`] of its first byte. So strangers who prove
/// fresh keys and then send half messages hold at most these bytes, not one message per connection.
#[derive(Debug)]
pub struct PendingBytes {
    total: usize,
    per_address: usize,
    state: Mutex<PendingState>,
}

#[derive(Debug, Default)]
struct PendingState {
    used: usize,
    by_address: HashMap<IpAddr, usize>,
    waiting: Vec<std::task::Waker>,
}

impl PendingBytes {
    fn new(total: usize, per_address: usize) -> PendingBytes {
        PendingBytes {
            total,
            per_address,
            state: Mutex::new(PendingState::default()),
        }
    }

    /// Whether a connection of `address` in the middle of a message may read on; if not, `cx`
    /// is woken when bytes are given back.
    fn may_read(&self, address: IpAddr, cx: &Context<'_>) -> bool {
        let mut state = self.state.lock().expect("pending lock");
        let mine = state.by_address.get(&address).copied().unwrap_or(0);
        if state.used < self.total && mine < self.per_address {
            return true;
        }
        state.waiting.push(cx.waker().clone());
        false
    }

    fn take(&self, address: IpAddr, bytes: usize) {
        let mut state = self.state.lock().expect("pending lock");
        state.used += bytes;
        *state.by_address.entry(address).or_insert(0) += bytes;
    }

    fn give_back(&self, address: IpAddr, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let waiting = {
            let mut state = self.state.lock().expect("pending lock");
            state.used = state.used.saturating_sub(bytes);
            if let Some(mine) = state.by_address.get_mut(&address) {
                *mine = mine.saturating_sub(bytes);
                if *mine == 0 {
                    state.by_address.remove(&address);
                }
            }
            std::mem::take(&mut state.waiting)
        };
        for waker in waiting {
            waker.wake();
        }
    }

    /// Bytes held now, in all.
    pub fn used(&self) -> usize {
        self.state.lock().expect("pending lock").used
    }
}

/// A peer call's request body, counted against the listener's [`PendingBytes`] until the service
/// says a whole message arrived ([`Proven::message_received`]).
struct PeerBody<B> {
    inner: B,
    proven: Proven,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> PeerBody<B> {
    fn new(inner: B, proven: Proven) -> PeerBody<B> {
        proven.0.calls.fetch_add(1, Ordering::AcqRel);
        PeerBody {
            inner,
            proven,
            deadline: None,
        }
    }
}

impl<B> Drop for PeerBody<B> {
    /// A call that ends — whole, reset mid-message, refused — gives back what it held: the bytes
    /// of a message that will never be whole must not stay counted while the connection lives.
    fn drop(&mut self) {
        self.proven.message_received();
        if self.proven.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = self
                .proven
                .0
                .idle_waker
                .lock()
                .expect("idle waker lock")
                .take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

fn message_timeout() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "a peer message was not finished within {} s of its first byte",
            MESSAGE_TIMEOUT.as_secs()
        ),
    )
}

impl<B> hyper::body::Body for PeerBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        let mid_message = this.proven.holds();
        if !mid_message {
            this.deadline = None;
        } else {
            let deadline = this
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(MESSAGE_TIMEOUT)));
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(message_timeout().into())));
            }
            let pending = &this.proven.0.pending;
            if !pending.may_read(this.proven.0.address, cx) {
                return Poll::Pending;
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.proven.took(data.len());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.proven.message_received();
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                this.proven.message_received();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connections a listener holds: in all and per address.
struct Tally {
    limits: ConnectionLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection's place in its [`Tally`], given back when the connection ends.
struct Admitted {
    tally: Arc<Tally>,
    address: IpAddr,
}

/// The address a remote is counted by (connections, bytes held for it): an IPv6 address's /64
/// prefix, an IPv4-mapped IPv6 address as IPv4.
pub fn address_of(remote: &SocketAddr) -> IpAddr {
    Tally::address_of(remote)
}

impl Tally {
    /// The address connections are counted by: an IPv6 address's /64 prefix.
    fn address_of(remote: &SocketAddr) -> IpAddr {
        match remote.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(std::net::Ipv6Addr::from(prefix))
                }
            },
            v4 => v4,
        }
    }

    /// A place for a connection from `remote`, or which cap it is past.
    fn admit(self: &Arc<Tally>, remote: &SocketAddr) -> Result<Admitted, String> {
        let address = Tally::address_of(remote);
        let mut open = self.open.lock().expect("tally lock");
        let limits = self.limits;
        // The node's own machine is served however many others connect (its per-address cap
        // still holds): the owner's CLI reaches a node under a flood.
        let loopback = remote.ip().is_loopback() || address.is_loopback();
        if open.0 >= limits.max_connections && !loopback {
            return Err(format!(
                "the node holds its most connections ({}); try again later",
                limits.max_connections
            ));
        }
        let from_here = open.1.entry(address).or_insert(0);
        if *from_here >= limits.max_per_address {
            return Err(format!(
                "too many connections from {address} (at most {} at once); close some",
                limits.max_per_address
            ));
        }
        *from_here += 1;
        open.0 += 1;
        Ok(Admitted {
            tally: self.clone(),
            address,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.tally.open.lock().expect("tally lock");
        open.0 -= 1;
        if let Some(count) = open.1.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.1.remove(&self.address);
            }
        }
    }
}

/// An accepted connection whose first [`PREFACE_BYTES`] must arrive by a deadline: hyper-util
/// reads them to tell HTTP/1.1 from HTTP/2 and has no deadline of its own, so a client that
/// connects and sends nothing (or half a preface) would hold its connection forever. It holds
/// the connection's place in the listener's tally, and counts what an unproven peer sends.
struct Guarded<IO> {
    io: IO,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    needed: usize,
    /// Until the flag is set, at most this many more bytes may be read, and only until the
    /// deadline.
    unproven: Option<Unproven>,
    /// A peer connection's mark (kept once proven): a proven connection with no call open is cut
    /// after [`IDLE_PEER_TIMEOUT`].
    peer: Option<Proven>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    _admitted: Admitted,
}

/// What a connection may still do before its peer proves its key.
struct Unproven {
    proven: Proven,
    left: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> Guarded<IO> {
    fn new(io: IO, admitted: Admitted, unproven: Option<(Proven, usize)>) -> Guarded<IO> {
        Guarded {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(HEADER_TIMEOUT))),
            needed: PREFACE_BYTES,
            peer: unproven.as_ref().map(|(proven, _)| proven.clone()),
            idle: None,
            unproven: unproven.map(|(proven, left)| Unproven {
                proven,
                left,
                deadline: Box::pin(tokio::time::sleep(UNPROVEN_TIMEOUT)),
            }),
            _admitted: admitted,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(unproven) = &self.unproven {
            if unproven.proven.is_set() {
                self.unproven = None;
            } else if unproven.left == 0 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "sent too much before proving its key",
                )));
            } else if unproven.deadline.is_elapsed() {
                return Poll::Ready(Err(unproven_timeout()));
            }
        }
        let before = buf.filled().len();
        // Never read past what an unproven peer may still send.
        let cap = self.unproven.as_ref().map(|unproven| unproven.left);
        let polled = match cap {
            Some(left) if left < buf.remaining() => {
                let mut limited = ReadBuf::new(buf.initialize_unfilled_to(left));
                let polled = Pin::new(&mut self.io).poll_read(cx, &mut limited);
                let read = limited.filled().len();
                buf.advance(read);
                polled
            }
            _ => Pin::new(&mut self.io).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                self.needed = self.needed.saturating_sub(read);
                if self.needed == 0 || read == 0 {
                    self.deadline = None;
                }
                if let Some(unproven) = &mut self.unproven {
                    unproven.left -= read;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // An idle connection that never proves a key (pings answered, no call) is cut.
                let unproven_expired = self.unproven.as_mut().is_some_and(|unproven| {
                    !unproven.proven.is_set() && unproven.deadline.as_mut().poll(cx).is_ready()
                });
                if unproven_expired {
                    return Poll::Ready(Err(unproven_timeout()));
                }
                // A proven peer with no call open: pings do not keep it.
                let this = &mut *self;
                match &this.peer {
                    Some(peer) if peer.idle(cx) => {
                        let idle = this
                            .idle
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(IDLE_PEER_TIMEOUT)));
                        if idle.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "a peer kept its connection open with no call",
                            )));
                        }
                    }
                    _ => this.idle = None,
                }
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

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
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

/// Serves `router` on `listener` within `limits` until `stop` completes, then lets open
/// connections finish (callers bound how long with their own grace period).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    // Connections still in their TLS handshake are not hyper's yet: this ends them at shutdown.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let tally = Arc::new(Tally {
        limits,
        open: Mutex::new((0, HashMap::new())),
    });
    let pending = Arc::new(PendingBytes::new(
        PEER_PENDING_BYTES,
        PEER_PENDING_PER_ADDRESS,
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    if !limits.http1 {
        builder = builder.http2_only();
    }
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
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(64 << 10)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(2 << 20);
    tokio::pin!(stop);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Forget connections that ended (the set holds each until it is joined).
        while connections.try_join_next().is_some() {}
        let admitted = match tally.admit(&remote) {
            Ok(admitted) => admitted,
            Err(reason) => {
                tracing::debug!(%remote, %reason, "connection refused");
                if limits.http1 && tls.is_none() {
                    // Say why to a plain HTTP client, best effort and briefly; then close.
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let mut tcp = tcp;
                        let answer = format!(
                            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}\n",
                            reason.len() + 1
                        );
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            tcp.write_all(answer.as_bytes()),
                        )
                        .await;
                    });
                }
                continue;
            }
        };
        // Small answers (an append's reply, a live frame) go out at once; a peer that vanished
        // without a word is noticed by the kernel's keepalive probes.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(15));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let unproven = limits
            .unproven_bytes
            .map(|budget| (Proven::new(pending.clone(), admitted.address), budget));
        let proven = unproven.as_ref().map(|(proven, _)| proven.clone());
        let body_proven = proven.clone();
        let local = tcp.local_addr().ok();
        let router = router.clone();
        // Set once the TLS handshake is done, before any request is read.
        let binding = Arc::new(std::sync::OnceLock::<ChannelBinding>::new());
        let session_binding = binding.clone();
        let service = tower::service_fn(move |mut request: axum::extract::Request| {
            let extensions = request.extensions_mut();
            if let Some(binding) = session_binding.get() {
                extensions.insert(*binding);
            }
            extensions.insert(ConnectInfo::<SocketAddr>(remote));
            extensions.insert(TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(remote),
            });
            if let Some(proven) = &proven {
                extensions.insert(proven.clone());
            }
            use tower::ServiceExt;
            router.clone().oneshot(request)
        });
        // A peer call's body counts against the listener's bytes of unfinished messages.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            service,
            move |request: hyper::Request<hyper::body::Incoming>| match &body_proven {
                Some(proven) => {
                    request.map(|body| axum::body::Body::new(PeerBody::new(body, proven.clone())))
                }
                None => request.map(axum::body::Body::new),
            },
        ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let served = match tls {
                None => {
                    let io = TokioIo::new(Guarded::new(tcp, admitted, unproven));
                    serve_one(&builder, limits.http1, io, service, watcher).await
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
                    match tls::server_binding(&stream) {
                        Ok(exported) => {
                            let _ = binding.set(exported);
                        }
                        Err(error) => {
                            tracing::debug!(%remote, %error, "no TLS channel binding");
                            return;
                        }
                    }
                    let io = TokioIo::new(Guarded::new(stream, admitted, unproven));
                    serve_one(&builder, limits.http1, io, service, watcher).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%remote, %error, "connection ended");
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

/// Serves one connection until it ends or the listener stops: with HTTP/1.1 upgrades (the live
/// binding's WebSocket) when `http1`, else HTTP/2 alone.
async fn serve_one<IO, S>(
    builder: &Builder<TokioExecutor>,
    http1: bool,
    io: TokioIo<IO>,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<axum::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if http1 {
        let connection = builder.serve_connection_with_upgrades(io, service);
        watcher.watch(connection.into_owned()).await
    } else {
        let connection = builder.serve_connection(io, service);
        watcher.watch(connection.into_owned()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(max_connections: usize, max_per_address: usize) -> Arc<Tally> {
        Arc::new(Tally {
            limits: ConnectionLimits {
                max_connections,
                max_per_address,
                ..ConnectionLimits::PEER
            },
            open: Mutex::new((0, HashMap::new())),
        })
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_prefix_and_a_mapped_ipv4_as_itself() {
        let one: SocketAddr = "[2001:db8:1:2:aaaa::1]:1".parse().unwrap();
        let other: SocketAddr = "[2001:db8:1:2:bbbb::9]:2".parse().unwrap();
        let elsewhere: SocketAddr = "[2001:db8:1:3::1]:1".parse().unwrap();
        assert_eq!(Tally::address_of(&one), Tally::address_of(&other));
        assert_ne!(Tally::address_of(&one), Tally::address_of(&elsewhere));
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:5".parse().unwrap();
        assert_eq!(
            Tally::address_of(&mapped),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn places_are_capped_in_all_and_per_address_and_given_back() {
        let tally = tally(3, 2);
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:1".parse().unwrap();
        let first = tally.admit(&a).unwrap();
        let _second = tally.admit(&a).unwrap();
        let refused = tally.admit(&a).err().unwrap();
        assert!(refused.contains("too many connections from 10.0.0.1 (at most 2"));
        let _third = tally.admit(&b).unwrap();
        let full = tally.admit(&c).err().unwrap();
        assert!(full.contains("holds its most connections (3)"), "{full}");
        drop(first);
        let _again = tally.admit(&c).unwrap();
        assert_eq!(tally.open.lock().unwrap().0, 3);
    }
}
