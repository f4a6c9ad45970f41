//! What the peer tests share: bounded runtimes and waits, a hand-driven
//! client that speaks protocol version 2 from its documentation (its
//! proofs, keys and tags computed here, independently of the crate), and
//! a frame-aware TCP proxy on 127.0.0.1 that can alter, replay or drop
//! frames.
//!
//! Every network wait is bounded by a timeout, every loop by a count or a
//! deadline.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::Error;
use ckpt_io::peer::protocol::{ErrorKind, HEADER_LEN, Header, Opcode, ProtocolError};
use ckpt_io::peer::{PeerConfig, PeerServer, PeerServerConfig, PeerServerHandle, PeerTier};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The group secret of the tests (36 bytes).
pub const SECRET: &[u8] = b"test secret shared by the peer group";
pub const MIB: usize = 1 << 20;
/// Bound on every test's async body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on every blocking read of a raw test client or proxy.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(30);

/// A runtime that, when dropped (also while a failed test unwinds), waits
/// at most 2 s for its tasks instead of forever.
pub struct Rt(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

pub fn rt() -> Rt {
    Rt(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    ))
}

pub fn server_config(budget: u64) -> PeerServerConfig {
    let mut c = PeerServerConfig::new(SECRET, budget);
    c.handshake_timeout = Duration::from_millis(500);
    c.io_timeout = Duration::from_secs(5);
    c
}

pub fn spawn(rt: &Rt, config: PeerServerConfig) -> PeerServerHandle {
    let _guard = rt.enter();
    PeerServer::spawn(config).expect("server")
}

pub fn spawn_servers(rt: &Rt, n: usize, budget: u64) -> Vec<PeerServerHandle> {
    (0..n).map(|_| spawn(rt, server_config(budget))).collect()
}

pub fn addrs(servers: &[PeerServerHandle]) -> Vec<SocketAddr> {
    servers.iter().map(PeerServerHandle::local_addr).collect()
}

pub fn peer_config(servers: &[SocketAddr], rank: u32) -> PeerConfig {
    let mut c = PeerConfig::new(servers.to_vec(), rank, SECRET);
    c.connect_timeout = Duration::from_secs(2);
    c.io_timeout = Duration::from_secs(5);
    c
}

pub fn tier(servers: &[SocketAddr], rank: u32) -> PeerTier {
    PeerTier::new(peer_config(servers, rank)).expect("tier")
}

pub fn block_on<F: Future>(rt: &Rt, f: F) -> F::Output {
    rt.block_on(async {
        tokio::time::timeout(TEST_TIMEOUT, f)
            .await
            .expect("test body timed out")
    })
}

pub fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

/// Waits (bounded) until `f` holds.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    // A hang guard: what is waited for takes milliseconds when it works.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The protocol error behind a tier error, if it has one.
pub fn protocol_error(e: &Error) -> Option<&ProtocolError> {
    let source = std::error::Error::source(e)?;
    // The source is shared (`Arc`): look through it.
    match source.downcast_ref::<ckpt_core::ErrorSource>() {
        Some(shared) => shared.downcast_ref::<ProtocolError>(),
        None => source.downcast_ref::<ProtocolError>(),
    }
}

/// Whether `e` says that a server refused with `kind`.
pub fn refused_with(e: &Error, kind: ErrorKind) -> bool {
    matches!(protocol_error(e), Some(ProtocolError::Remote { kind: k, .. }) if *k == kind)
}

// ---------------------------------------------------------------------
// Protocol version 2, from its documentation.

/// `version || client nonce || server nonce || identity length || identity`.
pub fn transcript(client_nonce: &[u8; 32], server_nonce: &[u8; 32], identity: &str) -> Vec<u8> {
    let mut t = vec![2u8];
    t.extend_from_slice(client_nonce);
    t.extend_from_slice(server_nonce);
    t.extend_from_slice(&(identity.len() as u16).to_le_bytes());
    t.extend_from_slice(identity.as_bytes());
    t
}

/// `HMAC-SHA256(secret, label || transcript)`.
pub fn proof(secret: &[u8], label: &[u8], transcript: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("key");
    m.update(label);
    m.update(transcript);
    m.finalize().into_bytes().into()
}

/// `(client to server, server to client)` frame keys.
pub fn frame_keys(secret: &[u8], transcript: &[u8]) -> ([u8; 32], [u8; 32]) {
    let mut material = (secret.len() as u64).to_le_bytes().to_vec();
    material.extend_from_slice(secret);
    material.extend_from_slice(transcript);
    (
        blake3::derive_key("ckpt-peer-v2 frame key client to server", &material),
        blake3::derive_key("ckpt-peer-v2 frame key server to client", &material),
    )
}

/// One direction's key and next sequence number.
pub struct Dir {
    pub key: [u8; 32],
    pub seq: u64,
}

impl Dir {
    /// The tag of the next frame (header, path and payload in `frame`).
    pub fn tag(&mut self, frame: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.seq.to_le_bytes());
        h.update(frame);
        self.seq += 1;
        *h.finalize().as_bytes()
    }
}

/// A frame without its tag.
pub fn frame(op: Opcode, flags: u16, path: &[u8], payload_len: u64, payload: &[u8]) -> Vec<u8> {
    frame_id(op, flags, 42, path, payload_len, payload)
}

pub fn frame_id(
    op: Opcode,
    flags: u16,
    id: u64,
    path: &[u8],
    payload_len: u64,
    payload: &[u8],
) -> Vec<u8> {
    let h = Header {
        opcode: op,
        flags,
        request_id: id,
        path_len: path.len() as u32,
        payload_len,
    };
    [&h.encode()[..], path, payload].concat()
}

/// A `ClientHello` frame.
pub fn client_hello(nonce: &[u8; 32], identity: &str) -> Vec<u8> {
    let payload = [&nonce[..], identity.as_bytes()].concat();
    frame_id(
        Opcode::ClientHello,
        0,
        0,
        b"",
        payload.len() as u64,
        &payload,
    )
}

/// A hand-driven client speaking the wire format directly.
pub struct Raw {
    pub s: TcpStream,
    /// Set once the handshake passed: frames are tagged.
    pub send: Option<Dir>,
    pub recv: Option<Dir>,
}

impl Raw {
    /// Connects, sending nothing.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, RAW_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(RAW_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(RAW_TIMEOUT)).expect("timeout");
        Raw {
            s,
            send: None,
            recv: None,
        }
    }

    /// Connects and authenticates as a client that dialled `addr`.
    pub fn authed(addr: SocketAddr) -> Raw {
        Raw::authed_as(addr, &addr.to_string(), SECRET)
    }

    /// Connects and runs the handshake by hand: checks the server's proof,
    /// sends its own, expects the tagged `Ok`.
    pub fn authed_as(addr: SocketAddr, identity: &str, secret: &[u8]) -> Raw {
        let mut raw = Raw::connect(addr);
        let nc = [5u8; 32];
        raw.send_raw(&client_hello(&nc, identity));
        let (op, _, body) = raw.reply();
        assert_eq!((op, body.len()), (Opcode::Hello, 64), "{body:?}");
        let mut ns = [0u8; 32];
        ns.copy_from_slice(&body[..32]);
        let t = transcript(&nc, &ns, identity);
        assert_eq!(
            body[32..],
            proof(secret, b"ckpt-peer-v2 server proof", &t),
            "the server's proof"
        );
        let mine = proof(secret, b"ckpt-peer-v2 client proof", &t);
        raw.send_raw(&frame_id(Opcode::Auth, 0, 1, b"", 32, &mine));
        let (c2s, s2c) = frame_keys(secret, &t);
        raw.send = Some(Dir { key: c2s, seq: 0 });
        raw.recv = Some(Dir { key: s2c, seq: 0 });
        let (op, _, body) = raw.reply();
        assert_eq!((op, body.len()), (Opcode::Ok, 0), "auth accepted");
        raw
    }

    /// Sends bytes as they are. The server may already have closed: that
    /// is an acceptable answer.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    /// Sends one frame, with its tag once the session is established.
    pub fn send_frame(&mut self, frame: &[u8]) {
        let tag = self.send.as_mut().map(|d| d.tag(frame));
        let mut all = frame.to_vec();
        all.extend(tag.iter().flatten());
        self.send_raw(&all);
    }

    /// Reads one frame, checking its tag once the session is established.
    pub fn reply(&mut self) -> (Opcode, u16, Vec<u8>) {
        let mut head = [0u8; HEADER_LEN];
        self.s.read_exact(&mut head).expect("reply header");
        let h = Header::decode(&head).expect("valid reply header");
        let mut body = vec![0u8; h.payload_len as usize];
        self.s.read_exact(&mut body).expect("reply body");
        if let Some(d) = self.recv.as_mut() {
            let mut tag = [0u8; 32];
            self.s.read_exact(&mut tag).expect("reply tag");
            let want = d.tag(&[&head[..], &body].concat());
            assert_eq!(tag, want, "the reply's tag");
        }
        (h.opcode, h.flags, body)
    }

    /// Expects an error frame of `kind`, then the end of the connection.
    pub fn expect_refusal(mut self, kind: ErrorKind, needle: &str) {
        let (op, flags, body) = self.reply();
        let msg = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(op, Opcode::Err, "{msg}");
        assert_eq!(ErrorKind::from_u16(flags), Some(kind), "{msg}");
        assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
        self.expect_closed();
    }

    /// Expects the server to close the connection (EOF or reset), after
    /// at most one error frame.
    pub fn expect_closed(mut self) {
        let deadline = Instant::now() + RAW_TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the connection is still open after {RAW_TIMEOUT:?}")
                }
                Ok(0) | Err(_) => return,
                Ok(_) => assert!(Instant::now() < deadline, "connection stays open"),
            }
        }
    }
}

// ---------------------------------------------------------------------
// A proxy that understands frames.

/// Which way a frame goes through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Client to server.
    ToServer,
    /// Server to client.
    ToClient,
}

/// A frame passing through the proxy.
#[derive(Debug, Clone)]
pub struct Passing {
    /// Which accepted connection (0, 1, ...).
    pub conn: usize,
    pub way: Way,
    /// Index among this connection's frames going this way.
    pub index: usize,
    /// The opcode byte, decoded if known.
    pub opcode: Option<Opcode>,
    /// Offset of the payload in the frame.
    pub payload_at: usize,
    pub payload_len: usize,
    /// Whether the frame ends with a tag.
    pub tagged: bool,
}

/// Decides what to forward for each frame: nothing (dropped), the frame,
/// a changed frame, or more frames (injected ones).
pub type Hook = Arc<dyn Fn(&Passing, Vec<u8>) -> Vec<Vec<u8>> + Send + Sync>;

/// A hook that forwards everything as it is.
pub fn faithful() -> Hook {
    Arc::new(|_, f| vec![f])
}

/// A TCP proxy on 127.0.0.1 that forwards frames through a [`Hook`]. The
/// first two frames to the server (`ClientHello`, `Auth`) and the first
/// to the client (`Hello`, or an `Err` instead) are untagged, the rest
/// tagged, as the protocol says.
pub struct Proxy {
    pub addr: SocketAddr,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens, so its address is known before the server behind it.
    pub fn bind() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        Proxy {
            addr: listener.local_addr().expect("addr"),
            listener,
            stop: Arc::default(),
            accepted: Arc::default(),
        }
    }

    /// Forwards every connection to `target` through `hook`.
    pub fn start(self, target: SocketAddr, hook: Hook) -> ProxyHandle {
        let stop = self.stop.clone();
        let accepted = self.accepted.clone();
        let listener = self.listener;
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + TEST_TIMEOUT;
            let mut n = 0;
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((client, _)) => {
                        accepted.fetch_add(1, Ordering::AcqRel);
                        let Ok(server) = TcpStream::connect_timeout(&target, RAW_TIMEOUT) else {
                            continue;
                        };
                        client.set_nonblocking(false).expect("blocking");
                        for s in [&client, &server] {
                            s.set_read_timeout(Some(RAW_TIMEOUT)).expect("timeout");
                            s.set_nodelay(true).expect("nodelay");
                        }
                        let (c2, s2) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        let h = hook.clone();
                        std::thread::spawn(move || pump(client, server, n, Way::ToServer, h));
                        let h = hook.clone();
                        std::thread::spawn(move || pump(s2, c2, n, Way::ToClient, h));
                        n += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ProxyHandle {
            addr: self.addr,
            stop: self.stop,
            accepted: self.accepted,
            thread: Some(thread),
        }
    }
}

/// A running proxy; stops accepting when dropped.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards frames from `src` to `dst` until either end closes.
fn pump(mut src: TcpStream, mut dst: TcpStream, conn: usize, way: Way, hook: Hook) {
    let untagged = match way {
        Way::ToServer => 2,
        Way::ToClient => 1,
    };
    for index in 0.. {
        let mut head = [0u8; HEADER_LEN];
        if src.read_exact(&mut head).is_err() {
            break;
        }
        let path_len = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
        let payload_len = u64::from_le_bytes(head[20..28].try_into().expect("8 bytes")) as usize;
        let tagged = index >= untagged;
        let rest = path_len + payload_len + if tagged { 32 } else { 0 };
        if rest > 256 * MIB {
            break;
        }
        let mut f = head.to_vec();
        f.resize(HEADER_LEN + rest, 0);
        if src.read_exact(&mut f[HEADER_LEN..]).is_err() {
            // Forward what there is: the receiver sees a truncated frame.
            break;
        }
        let info = Passing {
            conn,
            way,
            index,
            opcode: Opcode::from_u8(head[5]),
            payload_at: HEADER_LEN + path_len,
            payload_len,
            tagged,
        };
        for out in hook(&info, f) {
            if dst.write_all(&out).is_err() {
                return;
            }
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
}
