//! The peer server: objects in RAM, served over TCP to authenticated
//! clients. See the [module docs](super) for its role and
//! [`protocol`](super::protocol) for the wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::{Error, ObjectMeta, PutMode, Result};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::protocol::{
    self, ErrorKind, HEADER_LEN, Header, MAX_PATH, MIN_MAX_FRAME, Opcode, ProtocolError, Request,
};
use super::wire;

/// Settings of a [`PeerServer`].
#[derive(Clone)]
pub struct PeerServerConfig {
    /// Address to listen on (default `127.0.0.1:0`: loopback, any free
    /// port; [`PeerServerHandle::local_addr`] says which).
    pub bind: SocketAddr,
    /// Shared secret every client must prove it holds. Not empty; use 32
    /// random bytes.
    pub secret: Vec<u8>,
    /// Most bytes of objects held at once, staged writes included. A
    /// payload is counted before it is read; an overwrite needs room for
    /// the new object before the old one is released. Nothing is ever
    /// evicted to make room.
    pub memory_budget: u64,
    /// Largest `Put` or `WriteChunk` payload accepted (default 64 MiB,
    /// at least 64 KiB).
    pub max_frame: u64,
    /// Time a new connection has to authenticate (default 10 s).
    pub handshake_timeout: Duration,
    /// Time allowed without progress inside a frame (default 30 s).
    pub io_timeout: Duration,
    /// Time a connection may stay idle between requests before it is
    /// closed, dropping any unfinished write (default 10 min).
    pub idle_timeout: Duration,
    /// Most connections served at once; more are closed on accept
    /// (default 1024).
    pub max_connections: usize,
}

impl PeerServerConfig {
    /// A configuration with `secret`, `memory_budget` and defaults for the
    /// rest.
    pub fn new(secret: impl Into<Vec<u8>>, memory_budget: u64) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: secret.into(),
            memory_budget,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_connections: 1024,
        }
    }

    /// Listens on `addr` instead of a loopback port.
    pub fn with_bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.secret.is_empty() {
            return Err(Error::Config("peer server: the secret is empty".into()));
        }
        if self.max_frame < MIN_MAX_FRAME {
            return Err(Error::Config(format!(
                "peer server: max frame {} is below the minimum {MIN_MAX_FRAME}",
                self.max_frame
            )));
        }
        if self.max_connections == 0 {
            return Err(Error::Config(
                "peer server: max_connections must be at least 1".into(),
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
}

impl fmt::Debug for PeerServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServerConfig")
            .field("bind", &self.bind)
            .field("secret", &"<redacted>")
            .field("memory_budget", &self.memory_budget)
            .field("max_frame", &self.max_frame)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// An object: immutable pieces, as received. Reads send slices of them
/// without copying.
#[derive(Debug)]
struct Object {
    chunks: Vec<Bytes>,
    len: u64,
}

impl Object {
    /// The pieces covering `start..end` (which must be within the object).
    fn slices(&self, start: u64, end: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0u64;
        for c in &self.chunks {
            let (lo, hi) = (at, at + c.len() as u64);
            at = hi;
            if hi <= start || c.is_empty() {
                continue;
            }
            if lo >= end {
                break;
            }
            let s = start.max(lo) - lo;
            let e = end.min(hi) - lo;
            out.push(c.slice(s as usize..e as usize));
        }
        out
    }
}

/// The objects and the budget accounting: `used` is the size of every
/// stored object plus every live [`Reservation`].
#[derive(Debug)]
struct Store {
    objects: Mutex<BTreeMap<String, Arc<Object>>>,
    used: AtomicU64,
    budget: u64,
}

/// Bytes counted against the budget until dropped or published.
struct Reservation {
    store: Arc<Store>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.store.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

impl Reservation {
    fn absorb(&mut self, mut other: Reservation) {
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

impl Store {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Object>>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `n` bytes, or returns the bytes in use if they do not fit.
    fn reserve(self: &Arc<Self>, n: u64) -> std::result::Result<Reservation, u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|t| *t <= self.budget)
            })
            .map(|_| Reservation {
                store: self.clone(),
                bytes: n,
            })
    }

    /// Makes `object` visible under `path`; its bytes move from the
    /// reservation to the store. In create mode an existing object wins
    /// and the reservation is released.
    fn publish(
        &self,
        path: String,
        object: Object,
        mut reservation: Reservation,
        mode: PutMode,
    ) -> bool {
        let mut map = self.map();
        if mode == PutMode::Create && map.contains_key(&path) {
            return false;
        }
        debug_assert_eq!(reservation.bytes, object.len);
        reservation.bytes = 0;
        if let Some(old) = map.insert(path, Arc::new(object)) {
            self.used.fetch_sub(old.len, Ordering::AcqRel);
        }
        true
    }

    fn get(&self, path: &str) -> Option<Arc<Object>> {
        self.map().get(path).cloned()
    }

    fn delete(&self, path: &str) {
        if let Some(old) = self.map().remove(path) {
            self.used.fetch_sub(old.len, Ordering::AcqRel);
        }
    }

    fn list(&self, prefix: &str) -> Vec<ObjectMeta> {
        self.map()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                path: k.clone(),
                size: v.len,
            })
            .collect()
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
        let store = Arc::new(Store {
            objects: Mutex::default(),
            used: AtomicU64::new(0),
            budget: config.memory_budget,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            store: store.clone(),
            addr,
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
        tracing::info!(addr = %handle.local_addr(), "peer server running");
        rt.block_on(std::future::pending::<()>());
        drop(handle);
        Ok(())
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
            .field("memory_budget", &self.store.budget)
            .finish()
    }
}

impl PeerServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes held: stored objects plus writes in progress.
    pub fn used_bytes(&self) -> u64 {
        self.store.used.load(Ordering::Acquire)
    }

    /// The configured memory budget.
    pub fn memory_budget(&self) -> u64 {
        self.store.budget
    }

    /// Number of visible objects.
    pub fn object_count(&self) -> usize {
        self.store.map().len()
    }

    /// Stops accepting, closes every connection (dropping unfinished
    /// writes) and waits until all connection tasks have ended. The
    /// objects are gone afterwards, like a process that exited.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let objects = std::mem::take(&mut *self.store.map());
        let bytes: u64 = objects.values().map(|o| o.len).sum();
        self.store.used.fetch_sub(bytes, Ordering::AcqRel);
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
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let conn_stop = stop.clone();
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(addr = %shared.addr, %peer, "peer server: too many connections, refusing one");
                        drop(stream);
                        continue;
                    };
                    let shared = shared.clone();
                    let stop = conn_stop.clone();
                    conns.spawn(async move {
                        serve(stream, peer, shared, stop).await;
                        drop(permit);
                    });
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

/// A streamed write in progress on one connection.
struct Staged {
    path: String,
    chunks: Vec<Bytes>,
    len: u64,
    reservation: Reservation,
}

struct Connection {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    write: Option<Staged>,
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut conn = Connection {
        rd: BufReader::with_capacity(64 << 10, r),
        wr: BufWriter::with_capacity(64 << 10, w),
        peer,
        shared,
        write: None,
    };
    let end = tokio::select! {
        end = conn.run() => end,
        () = async { let _ = stop.wait_for(|s| *s).await; } => End::Quiet("server shutting down".into()),
    };
    conn.write = None;
    match end {
        End::Quiet(why) => {
            tracing::trace!(%peer, why, "peer connection closed");
        }
        End::Refuse { id, kind, message } => {
            if kind == ErrorKind::Auth {
                tracing::warn!(addr = %conn.shared.addr, %peer, message, "peer server: authentication failed");
            } else {
                tracing::debug!(addr = %conn.shared.addr, %peer, ?kind, message, "peer server: closing connection");
            }
            conn.close_with(id, kind, &message).await;
        }
    }
}

impl Connection {
    fn config(&self) -> &PeerServerConfig {
        &self.shared.config
    }

    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let t = self.config().io_timeout;
        wire::write_all_timed(&mut self.wr, frame, t, "sending a reply").await?;
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
        let _ = wire::discard_timed(&mut self.rd, 1 << 20, Duration::from_millis(200)).await;
    }

    async fn read_header(&mut self, timeout: Duration) -> std::result::Result<Header, End> {
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
        Ok(header)
    }

    async fn read_path(&mut self, h: &Header) -> std::result::Result<(Vec<u8>, String), End> {
        let len = h.path_len as usize;
        debug_assert!(len <= MAX_PATH);
        let mut raw = vec![0u8; len];
        let io = self.config().io_timeout;
        wire::read_exact_timed(&mut self.rd, &mut raw, io, "reading a path").await?;
        let path = h.decode_path(&raw).map_err(|e| refuse(h.request_id, e))?;
        Ok((raw, path))
    }

    async fn read_payload(&mut self, len: u64) -> std::io::Result<Bytes> {
        let io = self.config().io_timeout;
        wire::read_bytes_timed(&mut self.rd, len, len, io, "reading a payload").await
    }

    async fn run(&mut self) -> End {
        match self.run_inner().await {
            Ok(()) => End::Quiet("closed".into()),
            Err(end) => end,
        }
    }

    async fn run_inner(&mut self) -> std::result::Result<(), End> {
        let secret = self.config().secret.clone();
        let nonce = wire::nonce().map_err(|e| End::Refuse {
            id: 0,
            kind: ErrorKind::Internal,
            message: format!("no randomness: {e}"),
        })?;
        self.send(&protocol::encode_reply(Opcode::Hello, 0, 0, &nonce))
            .await?;
        let hs = self.config().handshake_timeout;
        let auth = tokio::time::timeout(hs, async {
            let h = self.read_header(hs).await?;
            if h.opcode != Opcode::Auth {
                return Err(refuse(
                    h.request_id,
                    ProtocolError::OutOfOrder {
                        opcode: h.opcode,
                        state: "before authentication",
                    },
                ));
            }
            let (raw, _) = self.read_path(&h).await?;
            let payload = self.read_payload(h.payload_len).await?;
            let req = Request::decode(&h, &raw, payload).map_err(|e| refuse(h.request_id, e))?;
            Ok((h.request_id, req))
        })
        .await
        .map_err(|_| End::Quiet(format!("no authentication within {hs:?}")))??;
        let (
            id,
            Request::Auth {
                mac,
                nonce: client_nonce,
            },
        ) = auth
        else {
            return Err(End::Quiet("unexpected handshake request".into()));
        };
        if !wire::verify_client_proof(&secret, &nonce, &mac) {
            return Err(End::Refuse {
                id,
                kind: ErrorKind::Auth,
                message: "authentication failed: the client does not hold this server's secret"
                    .into(),
            });
        }
        let proof = wire::server_proof(&secret, &client_nonce);
        self.ok(id, &proof).await?;

        loop {
            let idle = self.config().idle_timeout;
            let h = match self.read_header(idle).await {
                Ok(h) => h,
                Err(e) => return Err(e),
            };
            self.handle(h).await?;
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
             {used} bytes in use; older objects are kept",
            self.shared.store.budget
        )
    }

    async fn handle(&mut self, h: Header) -> std::result::Result<(), End> {
        let id = h.request_id;
        let open = self.write.is_some();
        match h.opcode {
            Opcode::Auth => return Err(Self::out_of_order(&h, "after authentication")),
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
        let (raw_path, path) = self.read_path(&h).await?;
        let store = self.shared.store.clone();

        // Bulk payloads are reserved against the budget before a byte of
        // them is read; a refused one is discarded as it arrives.
        let mut reservation = None;
        if matches!(h.opcode, Opcode::Put | Opcode::WriteChunk) {
            match store.reserve(h.payload_len) {
                Ok(r) => reservation = Some(r),
                Err(used) => {
                    let (target, staged) = match self.write.take() {
                        Some(w) => (w.path, Some(w.len)),
                        None => (path.clone(), None),
                    };
                    let msg = self.budget_message(&target, h.payload_len, used, staged);
                    tracing::warn!(addr = %self.shared.addr, peer = %self.peer, msg, "peer server: write refused");
                    let io = self.config().io_timeout;
                    wire::discard_timed(&mut self.rd, h.payload_len, io).await?;
                    self.error(id, ErrorKind::Budget, &msg).await?;
                    return Ok(());
                }
            }
        }
        let payload = self.read_payload(h.payload_len).await?;
        let req = Request::decode(&h, &raw_path, payload).map_err(|e| refuse(id, e))?;
        match req {
            Request::Put { path, mode, data } => {
                let object = Object {
                    len: data.len() as u64,
                    chunks: vec![data],
                };
                let Some(r) = reservation else {
                    return Err(End::Quiet("internal: no reservation".into()));
                };
                if store.publish(path.clone(), object, r, mode) {
                    self.ok(id, &[]).await?;
                } else {
                    self.error(
                        id,
                        ErrorKind::AlreadyExists,
                        &format!("`{path}` already exists"),
                    )
                    .await?;
                }
            }
            Request::Get { path } => match store.get(&path) {
                Some(o) => self.send_data(id, &o, 0, o.len).await?,
                None => self.not_found(id, &path).await?,
            },
            Request::GetRange { path, start, end } => match store.get(&path) {
                Some(o) if end <= o.len => self.send_data(id, &o, start, end).await?,
                Some(o) => {
                    let msg = format!(
                        "range {start}..{end} is past the end of `{path}` ({} bytes)",
                        o.len
                    );
                    self.error(id, ErrorKind::OutOfRange, &msg).await?;
                }
                None => self.not_found(id, &path).await?,
            },
            Request::Size { path } => match store.get(&path) {
                Some(o) => self.ok(id, &o.len.to_le_bytes()).await?,
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
                self.write = Some(Staged {
                    path,
                    chunks: Vec::new(),
                    len: 0,
                    reservation: Reservation {
                        store: store.clone(),
                        bytes: 0,
                    },
                });
                self.ok(id, &[]).await?;
            }
            Request::WriteChunk { data } => {
                let (Some(w), Some(r)) = (self.write.as_mut(), reservation) else {
                    return Err(End::Quiet("internal: no write or reservation".into()));
                };
                w.len += data.len() as u64;
                w.reservation.absorb(r);
                if !data.is_empty() {
                    w.chunks.push(data);
                }
                self.ok(id, &[]).await?;
            }
            Request::FinishWrite { mode } => {
                let Some(w) = self.write.take() else {
                    return Err(End::Quiet("internal: no write".into()));
                };
                let object = Object {
                    chunks: w.chunks,
                    len: w.len,
                };
                if store.publish(w.path.clone(), object, w.reservation, mode) {
                    self.ok(id, &[]).await?;
                } else {
                    let msg = format!("`{}` already exists", w.path);
                    self.error(id, ErrorKind::AlreadyExists, &msg).await?;
                }
            }
            Request::AbortWrite => {
                self.write = None;
                self.ok(id, &[]).await?;
            }
            Request::Auth { .. } => return Err(Self::out_of_order(&h, "after authentication")),
        }
        Ok(())
    }

    async fn not_found(&mut self, id: u64, path: &str) -> std::io::Result<()> {
        self.error(id, ErrorKind::NotFound, &format!("`{path}` not found"))
            .await
    }

    async fn send_data(
        &mut self,
        id: u64,
        o: &Object,
        start: u64,
        end: u64,
    ) -> std::io::Result<()> {
        let t = self.config().io_timeout;
        let head = protocol::encode_data_header(id, end - start);
        wire::write_all_timed(&mut self.wr, &head, t, "sending data").await?;
        for s in o.slices(start, end) {
            wire::write_all_timed(&mut self.wr, &s, t, "sending data").await?;
        }
        wire::flush_timed(&mut self.wr, t, "sending data").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_slices_cover_exactly_the_range() {
        let o = Object {
            chunks: vec![
                Bytes::from_static(b"abc"),
                Bytes::new(),
                Bytes::from_static(b"defg"),
                Bytes::from_static(b"h"),
            ],
            len: 8,
        };
        let cat = |s: Vec<Bytes>| s.iter().flat_map(|b| b.to_vec()).collect::<Vec<u8>>();
        for start in 0..=8 {
            for end in start..=8 {
                assert_eq!(
                    cat(o.slices(start, end)),
                    b"abcdefgh"[start as usize..end as usize].to_vec()
                );
            }
        }
    }

    #[test]
    fn reservations_release_and_publish() {
        let store = Arc::new(Store {
            objects: Mutex::default(),
            used: AtomicU64::new(0),
            budget: 100,
        });
        let r = store.reserve(60).map_err(|_| ()).expect("fits");
        assert_eq!(store.reserve(41).err(), Some(60));
        drop(r);
        assert_eq!(store.used.load(Ordering::Acquire), 0);
        let r = store.reserve(10).map_err(|_| ()).expect("fits");
        let o = Object {
            chunks: vec![Bytes::from(vec![0u8; 10])],
            len: 10,
        };
        assert!(store.publish("a".into(), o, r, PutMode::Create));
        assert_eq!(store.used.load(Ordering::Acquire), 10);
        // Create on an existing object: refused, reservation released.
        let r = store.reserve(5).map_err(|_| ()).expect("fits");
        let o = Object {
            chunks: vec![Bytes::from(vec![1u8; 5])],
            len: 5,
        };
        assert!(!store.publish("a".into(), o, r, PutMode::Create));
        assert_eq!(store.used.load(Ordering::Acquire), 10);
        // Overwrite releases the old object's bytes.
        let r = store.reserve(5).map_err(|_| ()).expect("fits");
        let o = Object {
            chunks: vec![Bytes::from(vec![1u8; 5])],
            len: 5,
        };
        assert!(store.publish("a".into(), o, r, PutMode::Overwrite));
        assert_eq!(store.used.load(Ordering::Acquire), 5);
        store.delete("a");
        store.delete("a");
        assert_eq!(store.used.load(Ordering::Acquire), 0);
    }
}
