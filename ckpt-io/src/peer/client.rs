//! [`PeerTier`]: a rank's client of the whole peer group.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ckpt_core::{Capabilities, Error, ObjectMeta, PutMode, Result, Tier, TierWriter};
use futures::future::{BoxFuture, join_all};
use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::protocol::{
    self, ErrorKind, HEADER_LEN, Header, MAC_LEN, MIN_MAX_FRAME, MIN_SECRET_LEN, NONCE_LEN, Opcode,
    ProtocolError, Request, TAG_LEN,
};
use super::session::{self, Session, Transcript};
use super::wire;

#[path = "ec.rs"]
mod ec;

/// How a handshake the server dropped (closed or reset after accepting
/// the connection) is told apart from a server that is down.
const HANDSHAKE_DROPPED: &str = "closed during the handshake";
/// Connections tried when the server drops the handshake (waits of 5, 20,
/// 80 ms between).
const HANDSHAKE_TRIES: u32 = 4;

/// Idle connections kept per server.
const POOL_PER_SERVER: usize = 8;
/// Most bytes reserved up front for a `Get` reply; the buffer grows as
/// data arrives.
const INITIAL_GET_BUFFER: u64 = 64 << 20;

/// Settings of a [`PeerTier`].
#[derive(Clone)]
pub struct PeerConfig {
    /// Every peer server's address; index `r` is rank `r`'s server.
    pub servers: Vec<SocketAddr>,
    /// This rank.
    pub rank: u32,
    /// Ranks per node (default 1): the default buddy of rank `r` is
    /// `(r + ranks_per_node) % servers.len()`, the same local rank on the
    /// next node.
    pub ranks_per_node: u32,
    /// Overrides the buddy rank.
    pub buddy: Option<u32>,
    /// The group's shared secret, at least [`MIN_SECRET_LEN`] (32) bytes.
    pub secret: Vec<u8>,
    /// Largest frame sent or accepted (default 64 MiB, at least 64 KiB).
    /// Writes and puts go in frames of at most 8 MiB and never more than
    /// this, which must not exceed the servers' own limit.
    pub max_frame: u64,
    /// Time allowed to connect and authenticate (default 5 s).
    pub connect_timeout: Duration,
    /// Time allowed without progress during a request (default 30 s).
    pub io_timeout: Duration,
    /// Reed–Solomon `(k, m)`: each data object (a shard file) is cut into
    /// `k` data fragments plus `m` parity fragments on `k + m` servers on
    /// distinct nodes, any `k` of which rebuild it. `None` (the default):
    /// one full replica on the buddy. See [`PeerConfig::erasure`].
    pub erasure: Option<(u32, u32)>,
}

impl PeerConfig {
    /// A configuration for `rank` in a group served at `servers`, with
    /// defaults for the rest.
    pub fn new(servers: Vec<SocketAddr>, rank: u32, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            servers,
            rank,
            ranks_per_node: 1,
            buddy: None,
            secret: secret.into(),
            max_frame: protocol::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            erasure: None,
        }
    }

    /// Erasure-codes data objects with `k` data and `m` parity fragments
    /// instead of replicating them on the buddy: host memory per rank
    /// `(k + m) / k` of its shard instead of 2x, and any `m` nodes may be
    /// lost at once. Fragment `i` of rank `r`'s shard goes to the server of
    /// rank `(r + i * ranks_per_node) % N`: fragment 0 on the rank's own
    /// server (so a group of `k + m` nodes suffices; with the own server
    /// left out a job would need `k + m + 1`), the others on the next
    /// `k + m - 1` nodes, never two on one node. Needs `N / ranks_per_node
    /// >= k + m`.
    ///
    /// ```
    /// use ckpt_io::PeerConfig;
    /// let servers = (0..6).map(|p| ([127, 0, 0, 1], 7000 + p).into()).collect();
    /// let cfg = PeerConfig::new(servers, 0, [7u8; 32]).erasure(4, 2);
    /// assert_eq!(cfg.erasure, Some((4, 2)));
    /// ```
    pub fn erasure(mut self, k: u32, m: u32) -> Self {
        self.erasure = Some((k, m));
        self
    }

    /// The buddy rank this configuration selects.
    pub fn buddy_rank(&self) -> u32 {
        let n = self.servers.len().max(1) as u64;
        self.buddy
            .unwrap_or_else(|| ((u64::from(self.rank) + u64::from(self.ranks_per_node)) % n) as u32)
    }
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("servers", &self.servers)
            .field("rank", &self.rank)
            .field("ranks_per_node", &self.ranks_per_node)
            .field("buddy", &self.buddy)
            .field("secret", &"<redacted>")
            .field("max_frame", &self.max_frame)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("erasure", &self.erasure)
            .finish()
    }
}

/// Why one request to one server failed.
#[derive(Debug)]
enum Fail {
    /// Could not connect, or the connection broke or stalled: the server
    /// is treated as absent.
    Unreachable(String),
    /// The handshake failed: the server did not prove it holds the
    /// secret, refused this client (its identity, its proof), or speaks
    /// another version. Skipped like an unreachable server, and for a
    /// while not dialled again.
    Handshake(ProtocolError),
    /// Not dialled: it failed its handshake recently (the error then).
    Skipped(ProtocolError),
    /// The server answered with an error.
    Refused { kind: ErrorKind, message: String },
    /// A frame from the server failed its tag; the connection is closed.
    Integrity(ProtocolError),
    /// The server answered something this client cannot accept.
    Broken(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Unreachable(e.to_string())
    }
}

fn broken(e: ProtocolError) -> Fail {
    Fail::Broken(e.to_string())
}

/// Where a `Data` reply goes.
enum Sink<'b> {
    /// No data expected.
    None,
    /// A new buffer; `Some(n)`: exactly `n` bytes expected.
    Alloc(Option<u64>),
    /// Exactly this buffer.
    Into(&'b mut [u8]),
}

enum Reply {
    Ok(Bytes),
    Data(Bytes),
    Filled,
    Entries(Vec<ObjectMeta>),
}

/// A reply as read, before its tag is checked.
enum Unchecked {
    Ok(Bytes),
    Err(ErrorKind, Bytes),
    Entries(Bytes),
    Data(Bytes),
    Filled,
}

/// The client's side of the handshake (see [`protocol`]): sends its
/// nonce and the identity dialled, checks the server's proof before
/// anything else leaves, then sends its own.
async fn handshake(
    stream: &mut BufReader<TcpStream>,
    identity: &str,
    secret: &[u8],
    t: Duration,
    max_frame: u64,
) -> std::result::Result<Transcript, Fail> {
    let client_nonce = session::nonce().map_err(|e| Fail::Broken(format!("no randomness: {e}")))?;
    let hello = Request::ClientHello {
        nonce: client_nonce,
        identity: identity.to_string(),
    }
    .encode(0);
    wire::write_all_timed(stream.get_mut(), &hello, t, "sending the handshake").await?;
    let mut head = [0u8; HEADER_LEN];
    wire::read_exact_timed(stream, &mut head, t, "waiting for the handshake").await?;
    let h = Header::decode(&head).map_err(Fail::Handshake)?;
    h.check_payload(max_frame).map_err(Fail::Handshake)?;
    match h.opcode {
        Opcode::Hello => {}
        Opcode::Err => {
            let mut msg = vec![0u8; h.payload_len as usize];
            wire::read_exact_timed(stream, &mut msg, t, "reading a refusal").await?;
            return Err(Fail::Handshake(ProtocolError::Remote {
                kind: ErrorKind::from_u16(h.flags).unwrap_or(ErrorKind::Internal),
                message: String::from_utf8_lossy(&msg).into_owned(),
            }));
        }
        other => {
            return Err(Fail::Handshake(ProtocolError::OutOfOrder {
                opcode: other,
                state: "in the handshake (expected Hello)",
            }));
        }
    }
    let mut body = [0u8; NONCE_LEN + MAC_LEN];
    wire::read_exact_timed(stream, &mut body, t, "reading the handshake").await?;
    let mut server_nonce = [0u8; NONCE_LEN];
    server_nonce.copy_from_slice(&body[..NONCE_LEN]);
    let transcript = Transcript::new(&client_nonce, &server_nonce, identity);
    if !transcript.verify_server_proof(secret, &body[NONCE_LEN..]) {
        return Err(Fail::Handshake(ProtocolError::BadServerProof {
            identity: identity.to_string(),
        }));
    }
    let auth = Request::Auth {
        proof: transcript.client_proof(secret),
    }
    .encode(1);
    wire::write_all_timed(stream.get_mut(), &auth, t, "sending the handshake").await?;
    Ok(transcript)
}

/// One authenticated connection.
struct Conn {
    stream: BufReader<TcpStream>,
    next_id: u64,
    io_timeout: Duration,
    max_frame: u64,
    session: Session,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        secret: &[u8],
        connect_timeout: Duration,
        io_timeout: Duration,
        max_frame: u64,
    ) -> std::result::Result<Conn, Fail> {
        let t = io_timeout.min(connect_timeout);
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Fail::Unreachable(format!("no connection within {connect_timeout:?}")))?
            .map_err(|e| Fail::Unreachable(format!("cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut stream = BufReader::with_capacity(64 << 10, stream);
        // The identity is the address as this client's configuration
        // lists it: what the server checks, what the proofs are bound to.
        let identity = addr.to_string();
        let transcript = handshake(&mut stream, &identity, secret, t, max_frame)
            .await
            .map_err(|f| match f {
                Fail::Unreachable(why) => Fail::Unreachable(format!("{HANDSHAKE_DROPPED}: {why}")),
                other => other,
            })?;
        let mut conn = Conn {
            stream,
            next_id: 2,
            io_timeout: t,
            max_frame,
            session: Session::client(&transcript, secret),
        };
        // The server's answer to `Auth` is its first tagged frame.
        match conn.read_reply(1, &mut Sink::None).await {
            Ok(Reply::Ok(b)) if b.is_empty() => {}
            Ok(_) => return Err(Fail::Broken("unexpected answer to Auth".into())),
            Err(Fail::Refused { kind, message }) => {
                return Err(Fail::Handshake(ProtocolError::Remote { kind, message }));
            }
            Err(Fail::Unreachable(why)) => {
                return Err(Fail::Unreachable(format!("{HANDSHAKE_DROPPED}: {why}")));
            }
            Err(e) => return Err(e),
        }
        conn.io_timeout = io_timeout;
        Ok(conn)
    }

    /// Whether an idle pooled connection still looks usable: nothing
    /// unread, not closed by the server.
    fn healthy(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.stream.get_ref().try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// Sends one frame, `head` (header, path, small payload) then `bulk`,
    /// and its tag.
    async fn send(&mut self, head: &[u8], bulk: &[Bytes]) -> std::io::Result<()> {
        let t = self.io_timeout;
        let bulk_len: usize = bulk.iter().map(Bytes::len).sum();
        let mut tag = self.session.send.next();
        let w = self.stream.get_mut();
        if bulk_len <= 64 << 10 {
            let mut frame = Vec::with_capacity(head.len() + bulk_len + TAG_LEN);
            frame.extend_from_slice(head);
            for b in bulk {
                frame.extend_from_slice(b);
            }
            tag.update(&frame);
            frame.extend_from_slice(&tag.finish());
            wire::write_all_timed(w, &frame, t, "sending a request").await
        } else {
            wire::write_hashed(w, head, t, "sending a request", &mut tag).await?;
            for b in bulk {
                wire::write_hashed(w, b, t, "sending a request", &mut tag).await?;
            }
            wire::write_all_timed(w, &tag.finish(), t, "sending a request").await
        }
    }

    async fn read_header(&mut self) -> std::result::Result<(Header, [u8; HEADER_LEN]), Fail> {
        let mut buf = [0u8; HEADER_LEN];
        wire::read_exact_timed(
            &mut self.stream,
            &mut buf,
            self.io_timeout,
            "waiting for a reply",
        )
        .await?;
        let h = Header::decode(&buf).map_err(broken)?;
        if h.opcode.is_request() {
            return Err(broken(ProtocolError::WrongDirection(h.opcode)));
        }
        h.check_payload(self.max_frame).map_err(broken)?;
        Ok((h, buf))
    }

    /// Sends a request (with `bulk` as its payload when given) and reads
    /// its reply.
    async fn call(
        &mut self,
        head: Header,
        path: &[u8],
        small: &[u8],
        bulk: &[Bytes],
        sink: &mut Sink<'_>,
    ) -> std::result::Result<Reply, Fail> {
        let id = self.next_id;
        self.next_id += 1;
        let header = Header {
            request_id: id,
            path_len: path.len() as u32,
            payload_len: (small.len() + bulk.iter().map(Bytes::len).sum::<usize>()) as u64,
            ..head
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + path.len() + small.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(path);
        frame.extend_from_slice(small);
        self.send(&frame, bulk).await?;
        self.read_reply(id, sink).await
    }

    async fn roundtrip(
        &mut self,
        req: &Request,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<Reply, Fail> {
        let id = self.next_id;
        self.next_id += 1;
        let (head, bulk) = req.encode_parts(id);
        self.send(&head, std::slice::from_ref(&bulk)).await?;
        self.read_reply(id, sink).await
    }

    /// Reads the reply to request `id`, hashing it as it arrives; nothing
    /// of it is used, and nothing returned, before its tag checks out (a
    /// `Sink::Into` buffer may hold unchecked bytes when this fails).
    async fn read_reply(
        &mut self,
        id: u64,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<Reply, Fail> {
        let (h, raw) = self.read_header().await?;
        let other_id = h.request_id != id;
        // A server closing the connection over a frame it could not trust
        // echoes that frame's id, whatever it was: its error still counts
        // (once its tag checks out).
        let closing = h.opcode == Opcode::Err
            && !ErrorKind::from_u16(h.flags).is_some_and(ErrorKind::keeps_connection);
        if other_id && !closing {
            return Err(Fail::Broken(format!(
                "reply to request {} while waiting for {id}",
                h.request_id
            )));
        }
        let mut tag = self.session.recv.next();
        tag.update(&raw);
        let t = self.io_timeout;
        let len = h.payload_len;
        let r = &mut self.stream;
        let got = match h.opcode {
            Opcode::Ok => Unchecked::Ok(
                wire::read_bytes_timed(r, len, len, t, "reading a reply", &mut tag).await?,
            ),
            Opcode::Err => {
                let kind = ErrorKind::from_u16(h.flags).unwrap_or(ErrorKind::Internal);
                let b =
                    wire::read_bytes_timed(r, len, len, t, "reading an error", &mut tag).await?;
                Unchecked::Err(kind, b)
            }
            Opcode::Entries => Unchecked::Entries(
                wire::read_bytes_timed(r, len, len, t, "reading a listing", &mut tag).await?,
            ),
            Opcode::Data => match sink {
                Sink::Into(buf) => {
                    if len != buf.len() as u64 {
                        return Err(Fail::Broken(format!(
                            "sent {len} bytes for a read of {}",
                            buf.len()
                        )));
                    }
                    wire::read_exact_hashed(r, buf, t, "reading data", &mut tag).await?;
                    Unchecked::Filled
                }
                Sink::Alloc(expect) => {
                    if let Some(n) = *expect
                        && n != len
                    {
                        return Err(Fail::Broken(format!("sent {len} bytes for a read of {n}")));
                    }
                    Unchecked::Data(
                        wire::read_bytes_timed(
                            r,
                            len,
                            len.min(INITIAL_GET_BUFFER),
                            t,
                            "reading data",
                            &mut tag,
                        )
                        .await?,
                    )
                }
                Sink::None => return Err(Fail::Broken("unexpected data".into())),
            },
            other => return Err(Fail::Broken(format!("unexpected {other} frame"))),
        };
        let sent = wire::read_tag(r, t).await?;
        if !tag.verify(&sent) {
            return Err(Fail::Integrity(ProtocolError::BadTag {
                opcode: h.opcode,
                seq: tag.seq(),
            }));
        }
        match got {
            Unchecked::Ok(b) => Ok(Reply::Ok(b)),
            Unchecked::Err(kind, b) => Err(Fail::Refused {
                kind,
                message: String::from_utf8_lossy(&b).into_owned(),
            }),
            Unchecked::Entries(b) => Ok(Reply::Entries(
                protocol::decode_entries(&b).map_err(broken)?,
            )),
            Unchecked::Data(b) => Ok(Reply::Data(b)),
            Unchecked::Filled => Ok(Reply::Filled),
        }
    }
}

/// Skipping a server that failed its handshake, for a while.
#[derive(Default)]
struct Backoff {
    until: Option<Instant>,
    delay: Duration,
    error: Option<ProtocolError>,
}

/// First pause after a failed handshake; doubled at each failure.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

struct Server {
    addr: SocketAddr,
    idle: Mutex<VecDeque<(tokio::runtime::Id, Conn)>>,
    backoff: Mutex<Backoff>,
}

struct Inner {
    servers: Vec<Server>,
    buddy: usize,
    rank: u32,
    secret: Vec<u8>,
    max_frame: u64,
    chunk: u64,
    connect_timeout: Duration,
    io_timeout: Duration,
    location: String,
    /// Erasure coding of data objects, if configured.
    ec: Option<ec::Layout>,
}

/// A tier in peer servers' memory. See the [module docs](super) for
/// where each object goes and what survives what.
///
/// Cheap to clone; clones share connections. Its futures must run inside
/// a tokio runtime.
#[derive(Clone)]
pub struct PeerTier {
    inner: Arc<Inner>,
}

impl fmt::Debug for PeerTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTier")
            .field("location", &self.inner.location)
            .field("rank", &self.inner.rank)
            .field(
                "servers",
                &self
                    .inner
                    .servers
                    .iter()
                    .map(|s| s.addr)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What is known after asking servers in turn for one object.
#[derive(Default)]
struct Misses {
    not_found: bool,
    unreachable: Vec<String>,
    /// Servers that failed their handshake, and the first such error.
    unauthenticated: Vec<String>,
    handshake: Option<ProtocolError>,
}

impl PeerTier {
    /// A client of the peer group `config.servers` for `config.rank`.
    /// Connects lazily: servers need not be up yet.
    pub fn new(config: PeerConfig) -> Result<Self> {
        let n = config.servers.len();
        if n == 0 {
            return Err(Error::Config("peer tier: no servers given".into()));
        }
        if config.rank as usize >= n {
            return Err(Error::Config(format!(
                "peer tier: rank {} but only {n} servers",
                config.rank
            )));
        }
        if config.ranks_per_node == 0 {
            return Err(Error::Config(
                "peer tier: ranks_per_node must be at least 1".into(),
            ));
        }
        let buddy = config.buddy_rank() as usize;
        if buddy >= n {
            return Err(Error::Config(format!(
                "peer tier: buddy rank {buddy} but only {n} servers"
            )));
        }
        if config.secret.len() < MIN_SECRET_LEN {
            return Err(Error::Config(format!(
                "peer tier: the secret is {} bytes; at least {MIN_SECRET_LEN} are required \
                 (use 32 random bytes, or their hex)",
                config.secret.len()
            )));
        }
        if config.max_frame < MIN_MAX_FRAME {
            return Err(Error::Config(format!(
                "peer tier: max frame {} is below the minimum {MIN_MAX_FRAME}",
                config.max_frame
            )));
        }
        if config.connect_timeout.is_zero() || config.io_timeout.is_zero() {
            return Err(Error::Config("peer tier: a timeout is zero".into()));
        }
        if buddy == config.rank as usize && n > 1 {
            tracing::warn!(
                rank = config.rank,
                "peer tier: the buddy is this rank's own server; set ranks_per_node or buddy"
            );
        }
        let ec = match config.erasure {
            Some((k, m)) => Some(ec::Layout::new(
                k,
                m,
                config.rank,
                config.ranks_per_node,
                n as u32,
            )?),
            None => None,
        };
        let location = match &ec {
            Some(l) => format!(
                "peer-ec{}+{}://{}",
                l.k, l.m, config.servers[config.rank as usize]
            ),
            None => format!("peer://{}", config.servers[buddy]),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                servers: config
                    .servers
                    .iter()
                    .map(|&addr| Server {
                        addr,
                        idle: Mutex::default(),
                        backoff: Mutex::default(),
                    })
                    .collect(),
                buddy,
                rank: config.rank,
                secret: config.secret,
                chunk: protocol::WRITE_CHUNK.min(config.max_frame),
                max_frame: config.max_frame,
                connect_timeout: config.connect_timeout,
                io_timeout: config.io_timeout,
                location,
                ec,
            }),
        })
    }

    /// The buddy's rank: the server that holds this rank's data objects.
    pub fn buddy(&self) -> u32 {
        self.inner.buddy as u32
    }

    /// The buddy server's address.
    pub fn buddy_addr(&self) -> SocketAddr {
        self.inner.servers[self.inner.buddy].addr
    }

    /// Every server's address, in rank order.
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.inner.servers.iter().map(|s| s.addr).collect()
    }

    fn addr(&self, idx: usize) -> SocketAddr {
        self.inner.servers[idx].addr
    }

    /// Server indices to read from: the buddy first, then the others.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let b = self.inner.buddy;
        std::iter::once(b).chain((0..self.inner.servers.len()).filter(move |&i| i != b))
    }

    fn check_path(&self, path: &str) -> Result<()> {
        protocol::validate_object_path(path).map_err(|e| Error::InvalidPath {
            path: path.to_string(),
            reason: format!("not a valid object path on {}: {e}", self.inner.location),
        })
    }

    fn backoff(&self, idx: usize) -> std::sync::MutexGuard<'_, Backoff> {
        self.inner.servers[idx]
            .backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A new authenticated connection to server `idx`, unless it failed
    /// its handshake recently: then it is skipped at once, with a pause
    /// that doubles at each failure (up to 30 s) and ends at the first
    /// success.
    async fn connect(&self, idx: usize) -> std::result::Result<Conn, Fail> {
        {
            let b = self.backoff(idx);
            if let (Some(until), Some(e)) = (b.until, &b.error)
                && Instant::now() < until
            {
                return Err(Fail::Skipped(e.clone()));
            }
        }
        let i = &self.inner;
        let mut result;
        let mut pause = Duration::from_millis(5);
        let mut tries = 0;
        loop {
            result = Conn::open(
                self.addr(idx),
                &i.secret,
                i.connect_timeout,
                i.io_timeout,
                i.max_frame,
            )
            .await;
            tries += 1;
            // A server that accepted the connection and then dropped it in
            // the handshake is up but busy (a flood of connections makes
            // it close the oldest handshakes): try again, a few times. A
            // refused connection is not retried.
            match &result {
                Err(Fail::Unreachable(why))
                    if why.starts_with(HANDSHAKE_DROPPED) && tries < HANDSHAKE_TRIES =>
                {
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                _ => break,
            }
        }
        let mut b = self.backoff(idx);
        match &result {
            Ok(_) => *b = Backoff::default(),
            Err(Fail::Handshake(e)) => {
                b.delay = (b.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                b.until = Some(Instant::now() + b.delay);
                b.error = Some(e.clone());
                tracing::warn!(
                    server = %self.addr(idx),
                    error = %e,
                    retry_in = ?b.delay,
                    "peer tier: server failed the handshake; skipping it"
                );
            }
            Err(_) => {}
        }
        result
    }

    fn take_idle(&self, idx: usize) -> Option<Conn> {
        let rt = tokio::runtime::Handle::try_current().ok()?.id();
        let mut idle = self.inner.servers[idx]
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while let Some(pos) = idle.iter().rposition(|(id, _)| *id == rt) {
            if let Some((_, c)) = idle.remove(pos)
                && c.healthy()
            {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, idx: usize, conn: Conn) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut idle = self.inner.servers[idx]
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() >= POOL_PER_SERVER {
            idle.pop_front();
        }
        idle.push_back((rt.id(), conn));
    }

    /// One request to one server, on a pooled connection when there is
    /// one; a stale pooled connection is retried once on a fresh one. A
    /// create, which must not run twice, always takes a fresh connection:
    /// a failure then means the server is gone, never that an idle
    /// connection was.
    async fn request(
        &self,
        idx: usize,
        req: &Request,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<Reply, Fail> {
        let create = matches!(
            req,
            Request::Put {
                mode: PutMode::Create,
                ..
            }
        );
        let pooled_conn = if create { None } else { self.take_idle(idx) };
        let (mut conn, pooled) = match pooled_conn {
            Some(c) => (c, true),
            None => (self.connect(idx).await?, false),
        };
        let mut result = conn.roundtrip(req, sink).await;
        if pooled && matches!(result, Err(Fail::Unreachable(_))) {
            conn = self.connect(idx).await?;
            result = conn.roundtrip(req, sink).await;
        }
        let reusable = match &result {
            Ok(_) => true,
            Err(Fail::Refused { kind, .. }) => kind.keeps_connection(),
            Err(_) => false,
        };
        if reusable {
            self.put_idle(idx, conn);
        }
        result
    }

    /// Maps a failure of `op` on `path` at server `idx` to an error.
    fn error(&self, idx: usize, op: &str, path: &str, fail: Fail) -> Error {
        map_fail(self.addr(idx), op, path, fail)
    }

    /// Records a miss (absent or unreachable) while reading in turn; any
    /// other failure is the answer and is returned.
    fn miss(&self, idx: usize, op: &str, path: &str, fail: Fail, m: &mut Misses) -> Option<Error> {
        match fail {
            Fail::Refused {
                kind: ErrorKind::NotFound,
                ..
            } => {
                m.not_found = true;
                None
            }
            Fail::Unreachable(why) => {
                let addr = self.addr(idx);
                tracing::warn!(server = %addr, op, path, error = %why, "peer server unreachable; trying the next one");
                m.unreachable.push(format!("{addr}: {why}"));
                None
            }
            // Warned about once, in `connect`, when it failed.
            Fail::Handshake(e) | Fail::Skipped(e) => {
                m.unauthenticated.push(format!("{}: {e}", self.addr(idx)));
                m.handshake.get_or_insert(e);
                None
            }
            other => Some(self.error(idx, op, path, other)),
        }
    }

    fn missed(&self, op: &str, path: &str, m: Misses) -> Error {
        let tier = self.inner.location.clone();
        if m.not_found {
            Error::NotFound {
                path: path.to_string(),
            }
        } else if !m.unreachable.is_empty() {
            Error::Backend {
                tier,
                retryable: true,
                message: format!(
                    "{op} `{path}`: no peer server reachable ({})",
                    [m.unreachable, m.unauthenticated].concat().join("; ")
                ),
                source: None,
            }
        } else {
            Error::Backend {
                tier,
                retryable: false,
                message: format!(
                    "{op} `{path}`: no peer server passed the handshake ({}); {HANDSHAKE_HINT}",
                    m.unauthenticated.join("; ")
                ),
                source: m.handshake.map(|e| Arc::new(e) as ckpt_core::ErrorSource),
            }
        }
    }

    /// Asks the buddy, then the others, until one has `path`.
    async fn read_any(&self, op: &str, req: Request, expect: Option<u64>) -> Result<Reply> {
        let path = match &req {
            Request::Get { path } | Request::GetRange { path, .. } | Request::Size { path } => {
                path.clone()
            }
            _ => String::new(),
        };
        let mut m = Misses::default();
        for idx in self.order() {
            let mut sink = match &req {
                Request::Size { .. } => Sink::None,
                _ => Sink::Alloc(expect),
            };
            match self.request(idx, &req, &mut sink).await {
                Ok(r) => return Ok(r),
                Err(f) => {
                    if let Some(e) = self.miss(idx, op, &path, f, &mut m) {
                        return Err(e);
                    }
                }
            }
        }
        Err(self.missed(op, &path, m))
    }

    /// Stores one metadata object on server `idx`: in one `Put` frame, or,
    /// if larger than a frame, as a streamed write finished in `mode`, on
    /// a fresh connection.
    async fn put_one(
        &self,
        idx: usize,
        path: &str,
        data: &Bytes,
        mode: PutMode,
    ) -> std::result::Result<(), Fail> {
        if data.len() as u64 <= self.inner.chunk {
            let req = Request::Put {
                path: path.to_string(),
                mode,
                data: data.clone(),
            };
            return self.request(idx, &req, &mut Sink::None).await.map(|_| ());
        }
        let mut conn = self.connect(idx).await?;
        let result = async {
            let begin = Request::BeginWrite {
                path: path.to_string(),
            };
            conn.roundtrip(&begin, &mut Sink::None).await?;
            let mut at = 0;
            while at < data.len() {
                let end = (at + self.inner.chunk as usize).min(data.len());
                conn.call(
                    Header::new(Opcode::WriteChunk, 0),
                    &[],
                    &[],
                    &[data.slice(at..end)],
                    &mut Sink::None,
                )
                .await?;
                at = end;
            }
            conn.roundtrip(&Request::FinishWrite { mode }, &mut Sink::None)
                .await
                .map(|_| ())
        }
        .await;
        let reusable = match &result {
            Ok(()) => true,
            Err(Fail::Refused { kind, .. }) => kind.keeps_connection(),
            Err(_) => false,
        };
        if reusable {
            self.put_idle(idx, conn);
        }
        result
    }

    /// Sends `req` to every server at once; returns each one's result.
    async fn broadcast(&self, req: &Request) -> Vec<(usize, std::result::Result<Reply, Fail>)> {
        join_all(
            self.order()
                .map(|idx| async move { (idx, self.request(idx, req, &mut Sink::None).await) }),
        )
        .await
    }
}

/// What to check when a handshake fails.
const HANDSHAKE_HINT: &str = "is the shared secret the same on every rank and server, \
     and does each server's identity match the address clients list?";

fn source(e: ProtocolError) -> Option<ckpt_core::ErrorSource> {
    Some(Arc::new(e))
}

fn map_fail(addr: SocketAddr, op: &str, path: &str, fail: Fail) -> Error {
    let tier = format!("peer://{addr}");
    let remote = |kind, message: &String| {
        source(ProtocolError::Remote {
            kind,
            message: message.clone(),
        })
    };
    match fail {
        Fail::Handshake(e) | Fail::Skipped(e) => Error::Backend {
            tier,
            retryable: false,
            message: format!(
                "{op} `{path}`: peer server {addr} failed the handshake: {e}; {HANDSHAKE_HINT}"
            ),
            source: source(e),
        },
        Fail::Integrity(e) => Error::Backend {
            tier,
            retryable: false,
            message: format!(
                "{op} `{path}`: a frame from peer server {addr} failed authentication, \
                 connection closed: {e}"
            ),
            source: source(e),
        },
        Fail::Unreachable(why) => Error::Backend {
            tier,
            retryable: true,
            message: format!("{op} `{path}`: peer server {addr} unreachable: {why}"),
            source: None,
        },
        Fail::Broken(why) => Error::Backend {
            tier,
            retryable: false,
            message: format!("{op} `{path}`: peer server {addr} broke the protocol: {why}"),
            source: None,
        },
        Fail::Refused { kind, message } => match kind {
            ErrorKind::NotFound => Error::NotFound {
                path: path.to_string(),
            },
            ErrorKind::AlreadyExists => Error::AlreadyExists {
                path: path.to_string(),
            },
            ErrorKind::OutOfRange => Error::Incomplete {
                path: path.to_string(),
                reason: format!("{message} (peer server {addr})"),
            },
            ErrorKind::Auth => Error::Backend {
                tier,
                retryable: false,
                message: format!(
                    "{op} `{path}`: peer server {addr} rejected authentication: {message}; \
                     {HANDSHAKE_HINT}"
                ),
                source: remote(kind, &message),
            },
            ErrorKind::Integrity => Error::Backend {
                tier,
                retryable: false,
                message: format!(
                    "{op} `{path}`: peer server {addr} found a frame from this client altered \
                     in transit and closed the connection: {message}"
                ),
                source: remote(kind, &message),
            },
            ErrorKind::Budget => Error::Backend {
                tier,
                retryable: false,
                message: format!("{op} `{path}`: peer server {addr} refused: {message}"),
                source: remote(kind, &message),
            },
            ErrorKind::Protocol | ErrorKind::InvalidPath | ErrorKind::Internal => Error::Backend {
                tier,
                retryable: false,
                message: format!("{op} `{path}`: peer server {addr} failed ({kind:?}): {message}"),
                source: remote(kind, &message),
            },
        },
    }
}

/// Writes shorter than this are copied into one buffer and sent together.
const COALESCE_BELOW: usize = 64 << 10;
/// The coalescing buffer is sent once it holds this much.
const COALESCE_FLUSH: usize = 1 << 20;

/// A streamed write to the buddy server on a connection of its own.
///
/// Each `write` is on the server (staged, acknowledged) when it returns,
/// so the writer never holds on to the caller's buffers: a checkpoint's
/// staging blocks go back to their pool as soon as they are sent. Large
/// writes are sent as they are, in frames of at most 8 MiB sliced out of
/// the caller's `Bytes`; small ones are copied together first, so a stream
/// of small writes does not cost one round trip each.
struct PeerWriter {
    conn: Option<Conn>,
    addr: SocketAddr,
    path: String,
    small: BytesMut,
    chunk: u64,
    failed: Option<String>,
}

impl PeerWriter {
    fn fail(&mut self, op: &str, fail: Fail) -> Error {
        self.conn = None;
        let e = map_fail(self.addr, op, &self.path, fail);
        self.failed = Some(e.to_string());
        e
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::Backend {
                tier: format!("peer://{}", self.addr),
                retryable: false,
                message: format!("write `{}` failed earlier: {why}", self.path),
                source: None,
            }),
            None => Ok(()),
        }
    }

    /// Sends the coalesced small writes, then `data`, in `WriteChunk`
    /// frames of at most `chunk` bytes, without copying `data`.
    async fn send(&mut self, data: Option<Bytes>) -> Result<()> {
        let mut pending: VecDeque<Bytes> = VecDeque::new();
        if !self.small.is_empty() {
            pending.push_back(self.small.split().freeze());
        }
        pending.extend(data.filter(|d| !d.is_empty()));
        while !pending.is_empty() {
            let mut parts = Vec::new();
            let mut left = self.chunk as usize;
            while left > 0 {
                let Some(front) = pending.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    parts.extend(pending.pop_front());
                } else {
                    parts.push(front.split_to(left));
                    left = 0;
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err(Error::InvalidState("peer writer is closed".into()));
            };
            let res = conn
                .call(
                    Header::new(Opcode::WriteChunk, 0),
                    &[],
                    &[],
                    &parts,
                    &mut Sink::None,
                )
                .await;
            if let Err(f) = res {
                return Err(self.fail("write", f));
            }
        }
        Ok(())
    }
}

impl TierWriter for PeerWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check()?;
            if data.len() < COALESCE_BELOW {
                self.small.extend_from_slice(&data);
                if self.small.len() >= COALESCE_FLUSH.min(self.chunk as usize) {
                    self.send(None).await?;
                }
                return Ok(());
            }
            self.send(Some(data)).await
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            self.check()?;
            self.send(None).await?;
            let Some(conn) = self.conn.as_mut() else {
                return Err(Error::InvalidState("peer writer is closed".into()));
            };
            let finish = Request::FinishWrite {
                mode: PutMode::Overwrite,
            };
            match conn.roundtrip(&finish, &mut Sink::None).await {
                Ok(_) => Ok(()),
                Err(f) => Err(self.fail("finish", f)),
            }
        })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            if let Some(mut conn) = self.conn.take() {
                // Best effort: closing the connection drops the staged
                // write on the server anyway.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.roundtrip(&Request::AbortWrite, &mut Sink::None),
                )
                .await;
            }
            Ok(())
        })
    }
}

impl Tier for PeerTier {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    /// Creates are atomic on the server that decides them (the
    /// coordinator's buddy); the data is in another process's memory; a
    /// node loss loses the objects held there (one replica per shard), so
    /// `survives_node` is `false`.
    fn capabilities(&self) -> Capabilities {
        let c = Capabilities::NONE
            .with_atomic_create(true)
            .with_survives_process(true);
        // Erasure-coded, a shard's fragments are on k + m distinct nodes.
        match &self.inner.ec {
            Some(_) => c.with_survives_node(true),
            None => c,
        }
    }

    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::create(self, ec, path)),
            None => self.raw_create(path),
        }
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_path(path)?;
            let buddy = self.inner.buddy;
            let others: Vec<usize> = self.order().skip(1).collect();
            let copy_to = |targets: Vec<usize>| {
                let data = &data;
                join_all(targets.into_iter().map(move |idx| async move {
                    (idx, self.put_one(idx, path, data, mode).await)
                }))
            };
            let results = match mode {
                // The buddy decides a create: only if it succeeds there do
                // the others get a copy.
                PutMode::Create => {
                    self.put_one(buddy, path, &data, mode)
                        .await
                        .map_err(|f| self.error(buddy, "put", path, f))?;
                    copy_to(others).await
                }
                PutMode::Overwrite => {
                    let mut all = copy_to(self.order().collect()).await;
                    if let (_, Err(f)) = all.remove(0) {
                        return Err(self.error(buddy, "put", path, f));
                    }
                    all
                }
            };
            for (idx, r) in results {
                match r {
                    Ok(_)
                    | Err(Fail::Refused {
                        kind: ErrorKind::AlreadyExists,
                        ..
                    }) => {}
                    // Warned about when its handshake failed.
                    Err(f @ Fail::Skipped(_)) => {
                        let e = self.error(idx, "put", path, f);
                        tracing::debug!(server = %self.addr(idx), path, error = %e, "peer tier: copy of a metadata object not stored on one server");
                    }
                    Err(f) => {
                        let e = self.error(idx, "put", path, f);
                        tracing::warn!(server = %self.addr(idx), path, error = %e, "peer tier: copy of a metadata object not stored on one server");
                    }
                }
            }
            Ok(())
        })
    }

    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::get(self, ec, path)),
            None => self.raw_get(path),
        }
    }

    fn get_range<'a>(&'a self, path: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::get_range(self, ec, path, range)),
            None => self.raw_get_range(path, range),
        }
    }

    fn read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::read_into(self, ec, path, offset, buf)),
            None => self.raw_read_into(path, offset, buf),
        }
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::size(self, ec, path)),
            None => self.raw_size(path),
        }
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::list(self, ec, prefix)),
            None => self.raw_list(prefix),
        }
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>> {
        match &self.inner.ec {
            Some(ec) => Box::pin(ec::delete(self, ec, path)),
            None => self.raw_delete(path),
        }
    }
}

/// The plain operations, object by object, on which erasure coding
/// builds.
impl PeerTier {
    fn raw_create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        self.create_on(self.inner.buddy, path)
    }

    /// A streamed write of `path` to server `idx`.
    fn create_on<'a>(
        &'a self,
        idx: usize,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        Box::pin(async move {
            self.check_path(path)?;
            let addr = self.addr(idx);
            let mut conn = self
                .connect(idx)
                .await
                .map_err(|f| self.error(idx, "create", path, f))?;
            conn.roundtrip(
                &Request::BeginWrite {
                    path: path.to_string(),
                },
                &mut Sink::None,
            )
            .await
            .map_err(|f| self.error(idx, "create", path, f))?;
            Ok(Box::new(PeerWriter {
                conn: Some(conn),
                addr,
                path: path.to_string(),
                small: BytesMut::new(),
                chunk: self.inner.chunk,
                failed: None,
            }) as Box<dyn TierWriter>)
        })
    }

    fn raw_get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            self.check_path(path)?;
            let req = Request::Get {
                path: path.to_string(),
            };
            match self.read_any("get", req, None).await? {
                Reply::Data(b) => Ok(b),
                other => Err(unexpected(self, path, &other)),
            }
        })
    }

    fn raw_get_range<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            self.check_path(path)?;
            if range.start > range.end {
                return Err(Error::Incomplete {
                    path: path.to_string(),
                    reason: format!("empty range {range:?}"),
                });
            }
            let req = Request::GetRange {
                path: path.to_string(),
                start: range.start,
                end: range.end,
            };
            match self
                .read_any("get_range", req, Some(range.end - range.start))
                .await?
            {
                Reply::Data(b) => Ok(b),
                other => Err(unexpected(self, path, &other)),
            }
        })
    }

    fn raw_read_into<'a>(
        &'a self,
        path: &'a str,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_path(path)?;
            let req = Request::GetRange {
                path: path.to_string(),
                start: offset,
                end: offset + buf.len() as u64,
            };
            let mut m = Misses::default();
            for idx in self.order() {
                match self.request(idx, &req, &mut Sink::Into(buf)).await {
                    Ok(_) => return Ok(()),
                    Err(f) => {
                        if let Some(e) = self.miss(idx, "read", path, f, &mut m) {
                            return Err(e);
                        }
                    }
                }
            }
            Err(self.missed("read", path, m))
        })
    }

    fn raw_size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.check_path(path)?;
            let req = Request::Size {
                path: path.to_string(),
            };
            match self.read_any("size", req, None).await? {
                Reply::Ok(b) if b.len() == 8 => {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&b);
                    Ok(u64::from_le_bytes(v))
                }
                other => Err(unexpected(self, path, &other)),
            }
        })
    }

    fn raw_list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            protocol::validate_prefix(prefix).map_err(|e| Error::InvalidPath {
                path: prefix.to_string(),
                reason: format!("not a valid prefix on {}: {e}", self.inner.location),
            })?;
            let req = Request::List {
                prefix: prefix.to_string(),
            };
            let results = join_all(self.order().map(|idx| {
                let req = &req;
                async move { (idx, self.request(idx, req, &mut Sink::None).await) }
            }))
            .await;
            let mut merged: BTreeMap<String, u64> = BTreeMap::new();
            let mut m = Misses::default();
            let mut answered = false;
            for (idx, r) in results {
                match r {
                    Ok(Reply::Entries(entries)) => {
                        answered = true;
                        for e in entries {
                            // The buddy's answer comes first and wins.
                            merged.entry(e.path).or_insert(e.size);
                        }
                    }
                    Ok(other) => return Err(unexpected(self, prefix, &other)),
                    Err(f) => {
                        if let Some(e) = self.miss(idx, "list", prefix, f, &mut m) {
                            return Err(e);
                        }
                    }
                }
            }
            if !answered {
                return Err(self.missed("list", prefix, m));
            }
            Ok(merged
                .into_iter()
                .map(|(path, size)| ObjectMeta { path, size })
                .collect())
        })
    }

    fn raw_delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_path(path)?;
            let req = Request::Delete {
                path: path.to_string(),
            };
            let mut m = Misses::default();
            let mut answered = false;
            for (idx, r) in self.broadcast(&req).await {
                match r {
                    Ok(_) => answered = true,
                    Err(f) => {
                        if let Some(e) = self.miss(idx, "delete", path, f, &mut m) {
                            return Err(e);
                        }
                    }
                }
            }
            if answered {
                Ok(())
            } else {
                Err(self.missed("delete", path, m))
            }
        })
    }
}

fn unexpected(tier: &PeerTier, path: &str, reply: &Reply) -> Error {
    let what = match reply {
        Reply::Ok(_) => "Ok",
        Reply::Data(_) | Reply::Filled => "Data",
        Reply::Entries(_) => "Entries",
    };
    Error::Backend {
        tier: tier.inner.location.clone(),
        retryable: false,
        message: format!("unexpected {what} reply for `{path}`"),
        source: None,
    }
}
