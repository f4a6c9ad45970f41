//! The peer server: objects in RAM, served over TCP to authenticated
//! clients. See the [module docs](super) for its role and
//! [`protocol`](super::protocol) for the wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{Error, Result};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::protocol::{
    self, ErrorKind, HEADER_LEN, Header, MAC_LEN, MAX_IDENTITY, MAX_PATH, MIN_MAX_FRAME,
    MIN_SECRET_LEN, NONCE_LEN, Opcode, ProtocolError, Request, TAG_LEN,
};
use super::session::{self, Session, Tagger, Transcript};
use super::store::{self, CHUNK_OVERHEAD, Object, Published, Reservation, Store};
use super::wire;

/// Settings of a [`PeerServer`].
#[derive(Clone)]
pub struct PeerServerConfig {
    /// Address to listen on (default `127.0.0.1:0`: loopback, any free
    /// port; [`PeerServerHandle::local_addr`] says which).
    pub bind: SocketAddr,
    /// Shared secret every client must prove it holds, and this server
    /// too: at least [`MIN_SECRET_LEN`] (32) bytes; use 32 random bytes
    /// (or their hex).
    pub secret: Vec<u8>,
    /// The identity clients must have dialled: the address as the
    /// clients' [`PeerConfig::servers`](super::PeerConfig::servers) lists
    /// it (`"10.0.0.5:7070"`). A client that dialled another identity (a
    /// relay forwarding it here) is refused. Default (`None`): the bound
    /// address when it is a specific IP; when bound to an unspecified IP
    /// (`0.0.0.0`, `::`), only the port is checked.
    pub identity: Option<String>,
    /// Most bytes held at once: objects (their data, their path and
    /// [`OBJECT_OVERHEAD`](super::OBJECT_OVERHEAD) each), staged writes,
    /// and deleted or replaced objects that a reader is still receiving.
    /// A payload is counted before it is read; an overwrite needs room for
    /// the new object before the old one is released. Nothing is ever
    /// evicted to make room.
    pub memory_budget: u64,
    /// Most objects stored at once (default 1 048 576); a new object past
    /// it is refused like one over the budget.
    pub max_objects: usize,
    /// Largest `Put` or `WriteChunk` payload accepted (default 64 MiB,
    /// at least 64 KiB).
    pub max_frame: u64,
    /// Time a new connection has to complete the handshake (default 2 s).
    pub handshake_timeout: Duration,
    /// Most connections in their handshake at once (default 64). When
    /// another arrives, the oldest is closed, so idle sockets cannot lock
    /// clients out; no buffer is allocated before the handshake passes.
    pub max_handshakes: usize,
    /// Time allowed without progress inside a frame (default 30 s).
    pub io_timeout: Duration,
    /// Slowest a payload may move, bytes per second (default 1 MiB/s): a
    /// payload of `n` bytes, received or sent, must be through within
    /// `io_timeout + n / min_payload_rate`, else the connection is closed,
    /// dropping any unfinished write and releasing what it reserved.
    pub min_payload_rate: u64,
    /// Time a connection may stay idle between requests before it is
    /// closed, dropping any unfinished write (default 10 min).
    pub idle_timeout: Duration,
    /// Most authenticated connections served at once; a client that
    /// passes the handshake past it is refused (default 1024).
    pub max_connections: usize,
}

impl PeerServerConfig {
    /// A configuration with `secret`, `memory_budget` and defaults for the
    /// rest.
    pub fn new(secret: impl Into<Vec<u8>>, memory_budget: u64) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: secret.into(),
            identity: None,
            memory_budget,
            max_objects: 1 << 20,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(2),
            max_handshakes: 64,
            io_timeout: Duration::from_secs(30),
            min_payload_rate: 1 << 20,
            idle_timeout: Duration::from_secs(600),
            max_connections: 1024,
        }
    }

    /// Listens on `addr` instead of a loopback port.
    pub fn with_bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Accepts only clients that dialled `identity` (see
    /// [`PeerServerConfig::identity`]).
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    fn validate(&self) -> Result<()> {
        if self.secret.len() < MIN_SECRET_LEN {
            return Err(Error::Config(format!(
                "peer server: the secret is {} bytes; at least {MIN_SECRET_LEN} are required \
                 (use 32 random bytes, or their hex)",
                self.secret.len()
            )));
        }
        if let Some(id) = &self.identity
            && (id.is_empty() || id.len() > MAX_IDENTITY)
        {
            return Err(Error::Config(format!(
                "peer server: identity {id:?} must be 1 to {MAX_IDENTITY} bytes"
            )));
        }
        if self.max_frame < MIN_MAX_FRAME {
            return Err(Error::Config(format!(
                "peer server: max frame {} is below the minimum {MIN_MAX_FRAME}",
                self.max_frame
            )));
        }
        for (name, n) in [
            ("max_connections", self.max_connections),
            ("max_handshakes", self.max_handshakes),
            ("max_objects", self.max_objects),
        ] {
            if n == 0 {
                return Err(Error::Config(format!(
                    "peer server: {name} must be at least 1"
                )));
            }
        }
        if self.min_payload_rate == 0 {
            return Err(Error::Config(
                "peer server: min_payload_rate must be at least 1 byte/s".into(),
            ));
        }
        for (name, t) in [
            ("handshake_timeout", self.handshake_timeout),
            ("io_timeout", self.io_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if t.is_zero() {
                return Err(Error::Config(format!("peer server: {name} is zero")));
            }
        }
        Ok(())
    }

    /// How long a payload of `len` bytes may take.
    fn payload_deadline(&self, len: u64) -> Duration {
        let secs = len as f64 / self.min_payload_rate as f64;
        self.io_timeout
            .saturating_add(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }
}

impl fmt::Debug for PeerServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServerConfig")
            .field("bind", &self.bind)
            .field("secret", &"<redacted>")
            .field("identity", &self.identity)
            .field("memory_budget", &self.memory_budget)
            .field("max_objects", &self.max_objects)
            .field("max_frame", &self.max_frame)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .field("io_timeout", &self.io_timeout)
            .field("min_payload_rate", &self.min_payload_rate)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Who a server is, as clients must have dialled it.
#[derive(Debug, Clone)]
enum Identity {
    /// Exactly this string.
    Exact(String),
    /// Any address with this port (bound to an unspecified IP).
    Port(u16),
}

impl Identity {
    fn of(config: &PeerServerConfig, bound: SocketAddr) -> Self {
        match &config.identity {
            Some(id) => Identity::Exact(id.clone()),
            None if bound.ip().is_unspecified() => Identity::Port(bound.port()),
            None => Identity::Exact(bound.to_string()),
        }
    }

    fn accepts(&self, dialled: &str) -> bool {
        match self {
            Identity::Exact(id) => id == dialled,
            Identity::Port(port) => dialled
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.port() == *port),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Exact(id) => f.write_str(id),
            Identity::Port(port) => write!(f, "any address on port {port}"),
        }
    }
}

/// Starts peer servers. See [`PeerServer::spawn`].
#[derive(Debug)]
pub struct PeerServer;

impl PeerServer {
    /// Binds `config.bind` and serves on the current tokio runtime until
    /// [`PeerServerHandle::shutdown`] or the handle is dropped. Must be
    /// called from within a runtime (`Runtime::enter` or a task).
    pub fn spawn(config: PeerServerConfig) -> Result<PeerServerHandle> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config("PeerServer::spawn must be called inside a tokio runtime".into())
        })?;
        let bind_err = |e| Error::Backend {
            tier: format!("peer://{}", config.bind),
            retryable: false,
            message: format!("cannot listen on {}: {e}", config.bind),
            source: None,
        };
        let std_listener = std::net::TcpListener::bind(config.bind).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = std_listener.local_addr().map_err(bind_err)?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let store = Store::new(config.memory_budget, config.max_objects);
        let (stop_tx, stop_rx) = watch::channel(false);
        let identity = Identity::of(&config, addr);
        let shared = Arc::new(Shared {
            gate: Gate {
                slots: Arc::new(Semaphore::new(config.max_connections)),
                pending: Mutex::default(),
            },
            config,
            store: store.clone(),
            addr,
            identity,
        });
        let task = runtime.spawn(accept_loop(listener, shared, stop_rx));
        tracing::debug!(%addr, "peer server listening");
        Ok(PeerServerHandle {
            addr,
            store,
            stop: stop_tx,
            task: Some(task),
        })
    }

    /// Runs a server on a runtime of its own and blocks forever: the body
    /// of a standalone server process. Returns only if the server cannot
    /// start.
    pub fn run_forever(config: PeerServerConfig) -> Result<()> {
        Self::run_until(
            config,
            |h| tracing::info!(addr = %h.local_addr(), "peer server running"),
            |_| std::future::pending::<Result<()>>(),
        )
        .map(|_| ())
    }

    /// Runs a server on a runtime of its own (2 worker threads) until the
    /// future `stop` builds (on that runtime: a signal handler, say)
    /// resolves; `started` then sees the running server (its address, to
    /// announce). Then the server shuts down (connections closed,
    /// memory dropped); returns what `stop` gave and the bytes and
    /// objects the server held at that moment.
    pub fn run_until<T, F>(
        config: PeerServerConfig,
        started: impl FnOnce(&PeerServerHandle),
        stop: impl FnOnce(&PeerServerHandle) -> F,
    ) -> Result<(T, u64, usize)>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckpt-peer")
            .enable_all()
            .build()
            .map_err(|e| Error::io("<tokio runtime>", e))?;
        let handle = {
            let _guard = rt.enter();
            PeerServer::spawn(config)?
        };
        // The stop condition first (a signal handler installed before the
        // server is announced cannot miss a signal sent right after).
        let stop = {
            let _guard = rt.enter();
            stop(&handle)
        };
        started(&handle);
        let out = rt.block_on(stop);
        let held = (handle.used_bytes(), handle.object_count());
        rt.block_on(handle.shutdown());
        Ok((out?, held.0, held.1))
    }
}

/// A running [`PeerServer`]. Dropping it stops the server.
pub struct PeerServerHandle {
    addr: SocketAddr,
    store: Arc<Store>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for PeerServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServerHandle")
            .field("addr", &self.addr)
            .field("used_bytes", &self.used_bytes())
            .field("memory_budget", &self.memory_budget())
            .finish()
    }
}

impl PeerServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes charged: stored objects, writes in progress, and removed
    /// objects still being sent to a reader.
    pub fn used_bytes(&self) -> u64 {
        self.store.budget().used()
    }

    /// The configured memory budget.
    pub fn memory_budget(&self) -> u64 {
        self.store.budget().limit()
    }

    /// Number of visible objects.
    pub fn object_count(&self) -> usize {
        self.store.len()
    }

    /// Stops accepting, closes every connection (dropping unfinished
    /// writes) and waits until all connection tasks have ended. The
    /// objects are gone afterwards, like a process that exited.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.store.clear();
    }
}

impl Drop for PeerServerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Shared {
    config: PeerServerConfig,
    store: Arc<Store>,
    addr: SocketAddr,
    identity: Identity,
    gate: Gate,
}

/// Admission: a bounded set of connections in their handshake (the
/// oldest is closed when a new one arrives and the set is full), then a
/// semaphore of authenticated slots.
struct Gate {
    slots: Arc<Semaphore>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    next: u64,
    /// Connections in their handshake, oldest first; sending (or
    /// dropping) the sender closes that connection.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    evicted: u64,
}

impl Gate {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection to the handshake, closing the oldest one
    /// in its handshake if `max` are already there.
    fn admit(&self, max: usize, addr: SocketAddr) -> (u64, oneshot::Receiver<()>) {
        let mut p = self.pending();
        if p.waiting.len() >= max
            && let Some((_, oldest)) = p.waiting.pop_first()
        {
            let _ = oldest.send(());
            p.evicted += 1;
            if p.evicted.is_power_of_two() {
                tracing::warn!(%addr, max, closed = p.evicted, "peer server: too many connections in their handshake; closing the oldest");
            }
        }
        let id = p.next;
        p.next += 1;
        let (tx, rx) = oneshot::channel();
        p.waiting.insert(id, tx);
        (id, rx)
    }

    /// Takes a connection out of the handshake set; false if it was closed
    /// to make room meanwhile.
    fn leave(&self, id: u64) -> bool {
        self.pending().waiting.remove(&id).is_some()
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let conn_stop = stop.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ticket = shared.gate.admit(shared.config.max_handshakes, shared.addr);
                    let shared = shared.clone();
                    let stop = conn_stop.clone();
                    conns.spawn(serve(stream, peer, shared, stop, ticket));
                }
                Err(e) => {
                    tracing::warn!(addr = %shared.addr, error = %e, "peer server: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
    tracing::debug!(addr = %shared.addr, "peer server stopped");
}

/// Why a connection ends.
enum End {
    /// Closed by the client, timed out or broken: nothing to say.
    Quiet(String),
    /// Refused: send an error frame, then close.
    Refuse {
        id: u64,
        kind: ErrorKind,
        message: String,
    },
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Quiet(e.to_string())
    }
}

fn refuse(id: u64, e: ProtocolError) -> End {
    End::Refuse {
        id,
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Reads one handshake frame's header and checks it.
async fn read_handshake_header(
    s: &mut TcpStream,
    expect: Opcode,
    io: Duration,
) -> std::result::Result<Header, End> {
    let mut buf = [0u8; HEADER_LEN];
    wire::read_exact_timed(s, &mut buf, io, "reading the handshake").await?;
    let id = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    let h = Header::decode(&buf).map_err(|e| refuse(id, e))?;
    if h.opcode != expect {
        return Err(refuse(
            id,
            ProtocolError::OutOfOrder {
                opcode: h.opcode,
                state: if expect == Opcode::ClientHello {
                    "before the handshake (expected ClientHello)"
                } else {
                    "in the handshake (expected Auth)"
                },
            },
        ));
    }
    h.check_payload(0).map_err(|e| refuse(id, e))?;
    Ok(h)
}

/// The server's side of the handshake, on the bare stream (no buffers).
/// `session` is set as soon as the server has sent its `Hello`, so that
/// a refusal after it is tagged. Returns the id of the `Auth` frame.
async fn handshake(
    s: &mut TcpStream,
    shared: &Shared,
    session: &mut Option<Session>,
) -> std::result::Result<u64, End> {
    // The caller bounds the whole handshake by its deadline; the steps by
    // the (longer) I/O timeout, so that the deadline is what ends it.
    let io = shared.config.io_timeout;
    let secret = &shared.config.secret;
    let h = read_handshake_header(s, Opcode::ClientHello, io).await?;
    let mut buf = [0u8; NONCE_LEN + MAX_IDENTITY];
    let payload = &mut buf[..h.payload_len as usize];
    wire::read_exact_timed(s, payload, io, "reading the handshake").await?;
    let req = Request::decode(&h, &[], Bytes::copy_from_slice(payload))
        .map_err(|e| refuse(h.request_id, e))?;
    let Request::ClientHello {
        nonce: client_nonce,
        identity,
    } = req
    else {
        return Err(End::Quiet("unexpected handshake request".into()));
    };
    if !shared.identity.accepts(&identity) {
        return Err(refuse(
            h.request_id,
            ProtocolError::IdentityMismatch {
                dialled: identity,
                identity: shared.identity.to_string(),
            },
        ));
    }
    let server_nonce = session::nonce().map_err(|e| End::Refuse {
        id: h.request_id,
        kind: ErrorKind::Internal,
        message: format!("no randomness: {e}"),
    })?;
    let transcript = Transcript::new(&client_nonce, &server_nonce, &identity);
    let mut hello = [0u8; NONCE_LEN + MAC_LEN];
    hello[..NONCE_LEN].copy_from_slice(&server_nonce);
    hello[NONCE_LEN..].copy_from_slice(&transcript.server_proof(secret));
    let frame = protocol::encode_reply(Opcode::Hello, 0, h.request_id, &hello);
    wire::write_all_timed(s, &frame, io, "sending the handshake").await?;
    *session = Some(Session::server(&transcript, secret));

    let h = read_handshake_header(s, Opcode::Auth, io).await?;
    let mut proof = [0u8; MAC_LEN];
    wire::read_exact_timed(s, &mut proof, io, "reading the handshake").await?;
    if !transcript.verify_client_proof(secret, &proof) {
        return Err(refuse(h.request_id, ProtocolError::BadClientProof));
    }
    Ok(h.request_id)
}

/// Sends a refusal on a connection that has not authenticated (tagged
/// once the server has sent its `Hello`), then closes it.
async fn refuse_unauthenticated(
    s: &mut TcpStream,
    session: Option<&mut Session>,
    id: u64,
    kind: ErrorKind,
    message: &str,
) {
    let mut frame = protocol::encode_error(id, kind, message);
    if let Some(session) = session {
        let mut tag = session.send.next();
        tag.update(&frame);
        frame.extend_from_slice(&tag.finish());
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.write_all(&frame).await;
        let _ = s.shutdown().await;
    })
    .await;
    wire::drain_small(s, 64 << 10, Duration::from_millis(200)).await;
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    (ticket, mut evicted): (u64, oneshot::Receiver<()>),
) {
    let _ = stream.set_nodelay(true);
    let hs = shared.config.handshake_timeout;
    let mut session = None;
    let outcome = tokio::select! {
        r = tokio::time::timeout(hs, handshake(&mut stream, &shared, &mut session)) => Some(r),
        _ = &mut evicted => None,
        () = stopped(&mut stop) => None,
    };
    let admitted = shared.gate.leave(ticket);
    let auth_id = match outcome {
        None => {
            tracing::trace!(%peer, "peer connection closed in its handshake");
            return;
        }
        Some(Err(_)) => {
            tracing::debug!(addr = %shared.addr, %peer, "peer server: no handshake within {hs:?}");
            if session.is_none() {
                // A version 1 client waits for the server to speak: tell
                // it, in a version 2 header, why it gets nothing.
                let msg = format!(
                    "no ClientHello within {hs:?}; this server speaks ckpt peer protocol version {}",
                    protocol::VERSION
                );
                refuse_unauthenticated(&mut stream, None, 0, ErrorKind::Protocol, &msg).await;
            }
            return;
        }
        Some(Ok(Err(End::Quiet(why)))) => {
            tracing::debug!(addr = %shared.addr, %peer, why, "peer server: handshake ended");
            return;
        }
        Some(Ok(Err(End::Refuse { id, kind, message }))) => {
            tracing::warn!(addr = %shared.addr, %peer, ?kind, message, "peer server: handshake refused");
            refuse_unauthenticated(&mut stream, session.as_mut(), id, kind, &message).await;
            return;
        }
        Some(Ok(Ok(id))) => id,
    };
    let Some(session) = session.filter(|_| admitted) else {
        return;
    };
    // Authenticated: now a slot and the buffers.
    let permit = shared.gate.slots.clone().try_acquire_owned();
    let (r, w) = stream.into_split();
    let mut conn = Connection {
        rd: BufReader::with_capacity(64 << 10, r),
        wr: BufWriter::with_capacity(64 << 10, w),
        peer,
        shared,
        write: None,
        session,
    };
    let Ok(_permit) = permit else {
        let max = conn.config().max_connections;
        tracing::warn!(addr = %conn.shared.addr, %peer, max, "peer server: too many connections, refusing one");
        let msg = format!("too many connections (at most {max}); try again later");
        conn.close_with(auth_id, ErrorKind::Internal, &msg).await;
        return;
    };
    let end = tokio::select! {
        end = conn.run(auth_id) => end,
        () = stopped(&mut stop) => End::Quiet("server shutting down".into()),
    };
    conn.write = None;
    match end {
        End::Quiet(why) => {
            tracing::trace!(%peer, why, "peer connection closed");
        }
        End::Refuse { id, kind, message } => {
            if matches!(kind, ErrorKind::Integrity | ErrorKind::Auth) {
                tracing::warn!(addr = %conn.shared.addr, %peer, ?kind, message, "peer server: closing connection");
            } else {
                tracing::debug!(addr = %conn.shared.addr, %peer, ?kind, message, "peer server: closing connection");
            }
            conn.close_with(id, kind, &message).await;
        }
    }
}

/// A streamed write in progress on one connection.
struct Staged {
    path: String,
    chunks: Vec<Bytes>,
    len: u64,
    reservation: Reservation,
}

/// An authenticated connection.
struct Connection {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    write: Option<Staged>,
    session: Session,
}

impl Connection {
    fn config(&self) -> &PeerServerConfig {
        &self.shared.config
    }

    /// Sends one frame (header and payload) and its tag.
    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let t = self.config().io_timeout;
        let mut tag = self.session.send.next();
        tag.update(frame);
        wire::write_all_timed(&mut self.wr, frame, t, "sending a reply").await?;
        wire::write_all_timed(&mut self.wr, &tag.finish(), t, "sending a reply").await?;
        wire::flush_timed(&mut self.wr, t, "sending a reply").await
    }

    async fn ok(&mut self, id: u64, payload: &[u8]) -> std::io::Result<()> {
        self.send(&protocol::encode_reply(Opcode::Ok, 0, id, payload))
            .await
    }

    async fn error(&mut self, id: u64, kind: ErrorKind, message: &str) -> std::io::Result<()> {
        self.send(&protocol::encode_error(id, kind, message)).await
    }

    /// Sends an error frame, then closes: the write half first, then,
    /// after draining what the client already sent (bounded), the rest,
    /// so the error is not lost to a connection reset.
    async fn close_with(&mut self, id: u64, kind: ErrorKind, message: &str) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.error(id, kind, message).await;
            let _ = self.wr.shutdown().await;
        })
        .await;
        let _ = wire::discard_timed(&mut self.rd, 1 << 20, Duration::from_millis(200), None).await;
    }

    async fn read_header(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<(Header, [u8; HEADER_LEN]), End> {
        let mut buf = [0u8; HEADER_LEN];
        // The first byte may take as long as the idle timeout; the rest of
        // the frame must follow promptly.
        let io = self.config().io_timeout;
        wire::read_exact_timed(
            &mut self.rd,
            &mut buf[..1],
            timeout,
            "waiting for a request",
        )
        .await?;
        wire::read_exact_timed(&mut self.rd, &mut buf[1..], io, "reading a header").await?;
        let id = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
        let header = Header::decode(&buf).map_err(|e| refuse(id, e))?;
        header
            .check_payload(self.config().max_frame)
            .map_err(|e| refuse(id, e))?;
        Ok((header, buf))
    }

    async fn read_path(
        &mut self,
        h: &Header,
        tag: &mut Tagger,
    ) -> std::result::Result<(Vec<u8>, String), End> {
        let len = h.path_len as usize;
        debug_assert!(len <= MAX_PATH);
        let mut raw = vec![0u8; len];
        let io = self.config().io_timeout;
        wire::read_exact_hashed(&mut self.rd, &mut raw, io, "reading a path", tag).await?;
        let path = h.decode_path(&raw).map_err(|e| refuse(h.request_id, e))?;
        Ok((raw, path))
    }

    /// Reads (or, with `keep` false, discards) a payload, hashing it, at
    /// no less than the minimum rate.
    async fn read_payload(
        &mut self,
        h: &Header,
        tag: &mut Tagger,
        keep: bool,
    ) -> std::result::Result<Bytes, End> {
        let len = h.payload_len;
        let io = self.config().io_timeout;
        let deadline = self.config().payload_deadline(len);
        let read = async {
            if keep {
                wire::read_bytes_timed(&mut self.rd, len, len, io, "reading a payload", tag).await
            } else {
                wire::discard_timed(&mut self.rd, len, io, Some(tag))
                    .await
                    .map(|()| Bytes::new())
            }
        };
        match tokio::time::timeout(deadline, read).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(refuse(
                h.request_id,
                ProtocolError::TooSlow {
                    opcode: h.opcode,
                    len,
                    rate: self.config().min_payload_rate,
                },
            )),
        }
    }

    /// Reads the frame's tag and checks it: nothing of the frame is used
    /// before this passes.
    async fn check_tag(&mut self, h: &Header, tag: &Tagger) -> std::result::Result<(), End> {
        let io = self.config().io_timeout;
        let got: [u8; TAG_LEN] = wire::read_tag(&mut self.rd, io).await?;
        if tag.verify(&got) {
            Ok(())
        } else {
            Err(refuse(
                h.request_id,
                ProtocolError::BadTag {
                    opcode: h.opcode,
                    seq: tag.seq(),
                },
            ))
        }
    }

    async fn run(&mut self, auth_id: u64) -> End {
        match self.run_inner(auth_id).await {
            Ok(()) => End::Quiet("closed".into()),
            Err(end) => end,
        }
    }

    async fn run_inner(&mut self, auth_id: u64) -> std::result::Result<(), End> {
        // The answer to `Auth`: the server's first tagged frame.
        self.ok(auth_id, &[]).await?;
        loop {
            let idle = self.config().idle_timeout;
            let (h, raw) = self.read_header(idle).await?;
            self.handle(h, raw).await?;
        }
    }

    fn out_of_order(h: &Header, state: &'static str) -> End {
        refuse(
            h.request_id,
            ProtocolError::OutOfOrder {
                opcode: h.opcode,
                state,
            },
        )
    }

    fn budget_message(&self, path: &str, need: u64, used: u64, staged: Option<u64>) -> String {
        let staged = staged
            .map(|s| format!(" ({s} bytes already staged, now dropped)"))
            .unwrap_or_default();
        format!(
            "memory budget of {} bytes exceeded: `{path}` needs {need} more bytes{staged}, \
             {used} bytes in use; older objects are kept (size the budget for keep_last + 1 \
             steps of the shards this server holds)",
            self.shared.store.budget().limit()
        )
    }

    fn count_message(&self, path: &str) -> String {
        format!(
            "object count limit of {} reached: `{path}` not stored; older objects are kept",
            self.shared.store.max_objects()
        )
    }

    /// Refuses a `Put`, `WriteChunk` or `BeginWrite` for lack of room,
    /// after its payload and tag (the refusal drops an open write, so the
    /// frame must be authentic); the connection stays usable.
    async fn refuse_write(
        &mut self,
        h: &Header,
        mut tag: Tagger,
        message: String,
    ) -> std::result::Result<(), End> {
        self.read_payload(h, &mut tag, false).await?;
        self.check_tag(h, &tag).await?;
        self.write = None;
        tracing::warn!(addr = %self.shared.addr, peer = %self.peer, message, "peer server: write refused");
        self.error(h.request_id, ErrorKind::Budget, &message)
            .await?;
        Ok(())
    }

    async fn handle(&mut self, h: Header, raw: [u8; HEADER_LEN]) -> std::result::Result<(), End> {
        let id = h.request_id;
        let open = self.write.is_some();
        match h.opcode {
            Opcode::ClientHello | Opcode::Auth => {
                return Err(Self::out_of_order(&h, "after the handshake"));
            }
            Opcode::Hello | Opcode::Ok | Opcode::Err | Opcode::Data | Opcode::Entries => {
                return Err(refuse(id, ProtocolError::WrongDirection(h.opcode)));
            }
            Opcode::WriteChunk | Opcode::FinishWrite if !open => {
                return Err(Self::out_of_order(&h, "with no write open"));
            }
            Opcode::WriteChunk | Opcode::FinishWrite | Opcode::AbortWrite => {}
            _ if open => return Err(Self::out_of_order(&h, "while a write is open")),
            _ => {}
        }
        let mut tag = self.session.recv.next();
        tag.update(&raw);
        let (raw_path, path) = self.read_path(&h, &mut tag).await?;
        let store = self.shared.store.clone();
        let budget = store.budget().clone();

        // What the request will hold is reserved before a byte of its
        // payload is read; a refused payload is discarded as it arrives.
        let charge = match h.opcode {
            Opcode::Put => Some(store::object_charge(&path, h.payload_len)),
            Opcode::WriteChunk if h.payload_len > 0 => Some(h.payload_len + CHUNK_OVERHEAD),
            Opcode::BeginWrite => Some(store::object_charge(&path, 0)),
            _ => None,
        };
        let mut reservation = None;
        if let Some(need) = charge {
            if matches!(h.opcode, Opcode::Put | Opcode::BeginWrite) && !store.has_room_for(&path) {
                let msg = self.count_message(&path);
                return self.refuse_write(&h, tag, msg).await;
            }
            match budget.reserve(need) {
                Ok(r) => reservation = Some(r),
                Err(used) => {
                    let (target, staged) = match &self.write {
                        Some(w) => (w.path.clone(), Some(w.len)),
                        None => (path.clone(), None),
                    };
                    let msg = self.budget_message(&target, need, used, staged);
                    return self.refuse_write(&h, tag, msg).await;
                }
            }
        }
        let payload = self.read_payload(&h, &mut tag, true).await?;
        self.check_tag(&h, &tag).await?;
        let req = Request::decode(&h, &raw_path, payload).map_err(|e| refuse(id, e))?;
        match req {
            Request::Put { path, mode, data } => {
                let Some(r) = reservation else {
                    return Err(End::Quiet("internal: no reservation".into()));
                };
                let len = data.len() as u64;
                let object = Object::new(vec![data], len, r);
                self.published(id, &path, store.publish(path.clone(), object, mode))
                    .await?;
            }
            Request::Get { path } => match store.get(&path) {
                Some(o) => self.send_data(id, &o, 0, o.len()).await?,
                None => self.not_found(id, &path).await?,
            },
            Request::GetRange { path, start, end } => match store.get(&path) {
                Some(o) if end <= o.len() => self.send_data(id, &o, start, end).await?,
                Some(o) => {
                    let msg = format!(
                        "range {start}..{end} is past the end of `{path}` ({} bytes)",
                        o.len()
                    );
                    self.error(id, ErrorKind::OutOfRange, &msg).await?;
                }
                None => self.not_found(id, &path).await?,
            },
            Request::Size { path } => match store.get(&path) {
                Some(o) => self.ok(id, &o.len().to_le_bytes()).await?,
                None => self.not_found(id, &path).await?,
            },
            Request::List { prefix } => {
                let entries = protocol::encode_entries(&store.list(&prefix));
                if entries.len() as u64 > self.config().max_frame {
                    return Err(End::Refuse {
                        id,
                        kind: ErrorKind::Internal,
                        message: format!(
                            "listing of `{prefix}` is {} bytes, over the frame limit; list a longer prefix",
                            entries.len()
                        ),
                    });
                }
                let head = protocol::encode_reply(Opcode::Entries, 0, id, &entries);
                self.send(&head).await?;
            }
            Request::Delete { path } => {
                store.delete(&path);
                self.ok(id, &[]).await?;
            }
            Request::BeginWrite { path } => {
                let Some(reservation) = reservation else {
                    return Err(End::Quiet("internal: no reservation".into()));
                };
                self.write = Some(Staged {
                    path,
                    chunks: Vec::new(),
                    len: 0,
                    reservation,
                });
                self.ok(id, &[]).await?;
            }
            Request::WriteChunk { data } => {
                let Some(w) = self.write.as_mut() else {
                    return Err(End::Quiet("internal: no write".into()));
                };
                if let Some(r) = reservation {
                    w.reservation.absorb(r);
                }
                w.len += data.len() as u64;
                if !data.is_empty() {
                    w.chunks.push(data);
                }
                self.ok(id, &[]).await?;
            }
            Request::FinishWrite { mode } => {
                let Some(w) = self.write.take() else {
                    return Err(End::Quiet("internal: no write".into()));
                };
                let object = Object::new(w.chunks, w.len, w.reservation);
                self.published(id, &w.path, store.publish(w.path.clone(), object, mode))
                    .await?;
            }
            Request::AbortWrite => {
                self.write = None;
                self.ok(id, &[]).await?;
            }
            Request::ClientHello { .. } | Request::Auth { .. } => {
                return Err(Self::out_of_order(&h, "after the handshake"));
            }
        }
        Ok(())
    }

    async fn published(&mut self, id: u64, path: &str, p: Published) -> std::io::Result<()> {
        match p {
            Published::Yes => self.ok(id, &[]).await,
            Published::Exists => {
                self.error(
                    id,
                    ErrorKind::AlreadyExists,
                    &format!("`{path}` already exists"),
                )
                .await
            }
            Published::TooMany => {
                let msg = self.count_message(path);
                tracing::warn!(addr = %self.shared.addr, peer = %self.peer, msg, "peer server: write refused");
                self.error(id, ErrorKind::Budget, &msg).await
            }
        }
    }

    async fn not_found(&mut self, id: u64, path: &str) -> std::io::Result<()> {
        self.error(id, ErrorKind::NotFound, &format!("`{path}` not found"))
            .await
    }

    /// Sends `start..end` of `o` as a `Data` frame, holding `o` (and so
    /// its charge) until the last byte is out, at no less than the
    /// minimum rate.
    async fn send_data(
        &mut self,
        id: u64,
        o: &Object,
        start: u64,
        end: u64,
    ) -> std::result::Result<(), End> {
        let t = self.config().io_timeout;
        let len = end - start;
        let deadline = self.config().payload_deadline(len);
        let rate = self.config().min_payload_rate;
        let head = protocol::encode_data_header(id, len);
        let mut tag = self.session.send.next();
        let wr = &mut self.wr;
        let send = async {
            wire::write_hashed(wr, &head, t, "sending data", &mut tag).await?;
            for s in o.slices(start, end) {
                wire::write_hashed(wr, &s, t, "sending data", &mut tag).await?;
            }
            wire::write_all_timed(wr, &tag.finish(), t, "sending data").await?;
            wire::flush_timed(wr, t, "sending data").await
        };
        match tokio::time::timeout(deadline, send).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(End::Quiet(format!(
                "the reader took {len} bytes slower than {rate} bytes/s"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        let c = PeerServerConfig::new([7u8; 32], 1);
        let exact = Identity::of(&c, "10.0.0.5:7070".parse().expect("addr"));
        assert!(exact.accepts("10.0.0.5:7070"));
        assert!(!exact.accepts("10.0.0.6:7070") && !exact.accepts("10.0.0.5:7071"));
        let any = Identity::of(&c, "0.0.0.0:7070".parse().expect("addr"));
        assert!(any.accepts("10.0.0.5:7070") && any.accepts("[::1]:7070"));
        assert!(!any.accepts("10.0.0.5:7071") && !any.accepts("host:7070"));
        let named = Identity::of(
            &c.clone().with_identity("node-3:7070"),
            "0.0.0.0:7070".parse().expect("addr"),
        );
        assert!(named.accepts("node-3:7070") && !named.accepts("10.0.0.5:7070"));
    }

    #[test]
    fn config_is_validated() {
        let e = PeerServerConfig::new(vec![1u8; 31], 1).validate();
        assert!(
            matches!(&e, Err(Error::Config(m)) if m.contains("31 bytes")),
            "{e:?}"
        );
        PeerServerConfig::new(vec![1u8; 32], 1)
            .validate()
            .expect("32 bytes");
        let mut c = PeerServerConfig::new(vec![1u8; 32], 1);
        c.max_handshakes = 0;
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        let c = PeerServerConfig::new(vec![1u8; 32], 1).with_identity("");
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        let c = PeerServerConfig::new(vec![1u8; 32], 1);
        assert_eq!(c.payload_deadline(0), c.io_timeout);
        assert_eq!(
            c.payload_deadline(3 << 20),
            c.io_timeout + Duration::from_secs(3)
        );
    }
}
