//! The wire protocol between a [`PeerTier`](super::PeerTier) and a
//! [`PeerServer`](super::PeerServer), version 2.
//!
//! Version 2 authenticates every frame; a version 1 peer is refused (its
//! frames carry version 1 in the header, see below).
//!
//! # Frames
//!
//! Every message is a frame: a fixed 28-byte header, then the path, then
//! the payload, then, once the session is established, a 32-byte tag
//! (see [Frame tags](#frame-tags)). Integers are little-endian.
//!
//! | offset | size | field                                               |
//! |-------:|-----:|-----------------------------------------------------|
//! | 0      | 4    | magic `CKPP`                                        |
//! | 4      | 1    | version, `2`                                        |
//! | 5      | 1    | opcode (see [`Opcode`])                             |
//! | 6      | 2    | flags: the [`PutMode`] of a `Put` or `FinishWrite` (0 overwrite, 1 create), the [`ErrorKind`] of an `Err`, else 0 |
//! | 8      | 8    | request id, chosen by the client, echoed by the reply |
//! | 16     | 4    | path length, at most [`MAX_PATH`] bytes             |
//! | 20     | 8    | payload length (the tag is not counted)             |
//!
//! The path is UTF-8. Object paths are relative: not empty, no leading
//! `/`, no empty, `.` or `..` component, no NUL or backslash. A `List`
//! prefix follows the same rules except that it may be empty and may end
//! with `/`. Operations that name no object carry no path.
//!
//! # Handshake
//!
//! The group shares a secret of at least [`MIN_SECRET_LEN`] bytes; it
//! never travels. The server proves itself first, so a client never
//! hands a proof to an endpoint that does not hold the secret.
//!
//! 1. The client sends `ClientHello`: its random 32-byte nonce `Nc`, then
//!    the identity it dialled, the server's address as listed in the
//!    client's configuration (`"10.0.0.5:7070"`, at most
//!    [`MAX_IDENTITY`] bytes of UTF-8).
//! 2. The server checks the identity against its own
//!    ([`PeerServerConfig::identity`](super::PeerServerConfig::identity);
//!    by default the address it is bound to, or only the port when bound
//!    to an unspecified address). On a mismatch it answers `Err(Auth)`
//!    and closes: a client relayed to the wrong server gets nowhere.
//!    Else it answers `Hello`: its random nonce `Ns` and its proof.
//! 3. The client checks the server's proof before it sends anything else;
//!    on failure it closes. Then it sends `Auth` with its own proof.
//! 4. The server checks the client's proof. It answers `Ok` (the first
//!    tagged frame), or `Err(Auth)` (tagged too) and closes.
//!
//! Both proofs cover the whole transcript
//! `T = version (1 byte) || Nc || Ns || identity length (u16) || identity`:
//!
//! ```text
//! server proof = HMAC-SHA256(secret, "ckpt-peer-v2 server proof" || T)
//! client proof = HMAC-SHA256(secret, "ckpt-peer-v2 client proof" || T)
//! ```
//!
//! so a proof made for one session, server or direction is useless for
//! any other. A server that cannot answer within its handshake deadline
//! (2 s by default) is closed; if the client sent nothing at all (a
//! version 1 client waits for the server to speak first), the server
//! first sends an `Err(Protocol)` frame with version 2 in its header.
//!
//! # Frame tags
//!
//! Each direction has a key derived from the secret and the transcript
//! ([BLAKE3](https://github.com/BLAKE3-team/BLAKE3-specs) `derive_key`):
//!
//! ```text
//! material = len(secret) (u64) || secret || T
//! K_c2s = BLAKE3-derive_key("ckpt-peer-v2 frame key client to server", material)
//! K_s2c = BLAKE3-derive_key("ckpt-peer-v2 frame key server to client", material)
//! ```
//!
//! Every frame after the handshake frames (`ClientHello`, `Hello`,
//! `Auth`, and an `Err` sent instead of `Hello`) ends with
//! `tag = BLAKE3-keyed(K_dir, n (u64) || header || path || payload)`,
//! where `n` counts that direction's tagged frames from 0 (the server's
//! answer to `Auth` is its frame 0, the client's first request its frame
//! 0). The sequence numbers are implicit: a dropped, replayed, reordered,
//! reflected or modified frame fails its tag, and the receiver closes the
//! connection (a server answers `Err(Integrity)` first). A streamed
//! payload (`Data`, `Put`, `WriteChunk`) is hashed as it arrives and its
//! tag checked before the bytes are used: a server stores nothing, a
//! client returns an error. Traffic is authenticated, not encrypted.
//!
//! # Session
//!
//! Requests follow the handshake, one at a time: each gets exactly one
//! reply with its request id.
//!
//! | request      | path   | payload                  | reply                        |
//! |--------------|--------|--------------------------|------------------------------|
//! | `Put`        | object | the object (≤ max frame) | `Ok`                         |
//! | `Get`        | object | —                        | `Data` (the whole object)    |
//! | `GetRange`   | object | start u64, end u64       | `Data` (exactly end − start) |
//! | `Size`       | object | —                        | `Ok` with the size as u64    |
//! | `List`       | prefix | —                        | `Entries`                    |
//! | `Delete`     | object | —                        | `Ok` (also when absent)      |
//! | `BeginWrite` | object | —                        | `Ok`                         |
//! | `WriteChunk` | —      | bytes (≤ max frame)      | `Ok`                         |
//! | `FinishWrite`| —      | — (flags: put mode)      | `Ok`: the object is visible  |
//! | `AbortWrite` | —      | —                        | `Ok`                         |
//!
//! Any request can instead be answered by `Err`: flags carry the
//! [`ErrorKind`], the payload a UTF-8 message (at most [`MAX_MESSAGE`]
//! bytes). `NotFound`, `AlreadyExists`, `OutOfRange` and `Budget` leave
//! the connection usable; after any other kind the server closes it.
//!
//! A `Data` reply's payload is streamed: its length is the requested
//! range's, which the client checks against what it asked for, and it is
//! not bound by the frame limit. `Entries` is a list of `(size u64, path
//! length u16, path)` records, bound by the frame limit.
//!
//! # Streamed writes
//!
//! `BeginWrite` opens one staged object per connection; `WriteChunk`s
//! append to it; `FinishWrite` makes it visible under its path at once,
//! replacing any older object, or, in create mode, only if no object
//! exists there (else `Err(AlreadyExists)` and the write is dropped);
//! `AbortWrite`, a refused chunk or the end of the connection drops it.
//! Clients send objects larger than one frame this way, also for `put`.
//! While a write is open, only `WriteChunk`, `FinishWrite` and
//! `AbortWrite` are accepted.
//!
//! # Rejected input
//!
//! A frame with a bad magic or version, an unknown opcode, a path that is
//! too long or invalid, a payload larger than the frame limit (checked
//! before anything is allocated) or of the wrong length for its opcode, a
//! frame out of order (anything but `ClientHello` first or `Auth` second,
//! a handshake frame later, a `WriteChunk` or `FinishWrite` with no write
//! open, a `BeginWrite` or any other request while one is open) is
//! answered with `Err(Protocol)` (or `Err(InvalidPath)`) and the
//! connection is closed. So is a `Put` or `WriteChunk` payload that
//! arrives slower than the server's minimum rate
//! ([`PeerServerConfig::min_payload_rate`](super::PeerServerConfig::min_payload_rate)).

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ckpt_core::{ObjectMeta, PutMode};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CKPP";
/// Protocol version this crate speaks.
pub const VERSION: u8 = 2;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 28;
/// Longest path or prefix, in bytes.
pub const MAX_PATH: usize = 1024;
/// Length of the server's and the client's nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof.
pub const MAC_LEN: usize = 32;
/// Length of a frame tag (keyed BLAKE3).
pub const TAG_LEN: usize = 32;
/// Shortest group secret a server or client accepts, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Longest identity a `ClientHello` may carry, in bytes.
pub const MAX_IDENTITY: usize = 255;
/// Longest error message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest `Ok` payload (a size).
pub const MAX_OK_PAYLOAD: usize = 64;
/// What the server's proof covers before the transcript.
pub const SERVER_PROOF_LABEL: &[u8] = b"ckpt-peer-v2 server proof";
/// What the client's proof covers before the transcript.
pub const CLIENT_PROOF_LABEL: &[u8] = b"ckpt-peer-v2 client proof";
/// BLAKE3 `derive_key` context of the client-to-server frame key.
pub const CLIENT_TO_SERVER_KEY_CONTEXT: &str = "ckpt-peer-v2 frame key client to server";
/// BLAKE3 `derive_key` context of the server-to-client frame key.
pub const SERVER_TO_CLIENT_KEY_CONTEXT: &str = "ckpt-peer-v2 frame key server to client";
/// Default limit on a request frame's payload (64 MiB).
pub const DEFAULT_MAX_FRAME: u64 = 64 << 20;
/// Smallest frame limit a server or client accepts (64 KiB).
pub const MIN_MAX_FRAME: u64 = 64 << 10;
/// Largest chunk a client sends in one `WriteChunk` (8 MiB).
pub const WRITE_CHUNK: u64 = 8 << 20;

/// Kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// The client's opening: its nonce and the identity it dialled.
    ClientHello = 1,
    /// Store a small object in one frame.
    Put = 2,
    /// Read a whole object.
    Get = 3,
    /// Read a byte range.
    GetRange = 4,
    /// Size of an object.
    Size = 5,
    /// Objects under a prefix.
    List = 6,
    /// Remove an object.
    Delete = 7,
    /// Open a streamed write.
    BeginWrite = 8,
    /// Append to the open write.
    WriteChunk = 9,
    /// Publish the open write.
    FinishWrite = 10,
    /// Drop the open write.
    AbortWrite = 11,
    /// The client's proof, after it checked the server's.
    Auth = 12,
    /// The server's answer to `ClientHello`: its nonce and its proof.
    Hello = 0x80,
    /// Success.
    Ok = 0x81,
    /// Failure, with an [`ErrorKind`] and a message.
    Err = 0x82,
    /// Object bytes.
    Data = 0x83,
    /// A listing.
    Entries = 0x84,
}

impl Opcode {
    /// Decodes an opcode byte.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        const ALL: [Opcode; 17] = [
            Opcode::ClientHello,
            Opcode::Auth,
            Opcode::Put,
            Opcode::Get,
            Opcode::GetRange,
            Opcode::Size,
            Opcode::List,
            Opcode::Delete,
            Opcode::BeginWrite,
            Opcode::WriteChunk,
            Opcode::FinishWrite,
            Opcode::AbortWrite,
            Opcode::Hello,
            Opcode::Ok,
            Opcode::Err,
            Opcode::Data,
            Opcode::Entries,
        ];
        ALL.into_iter().find(|op| *op as u8 == b)
    }

    /// Whether clients send this opcode (as opposed to servers).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }

    fn path_rule(self) -> PathRule {
        match self {
            Opcode::Put
            | Opcode::Get
            | Opcode::GetRange
            | Opcode::Size
            | Opcode::Delete
            | Opcode::BeginWrite => PathRule::Object,
            Opcode::List => PathRule::Prefix,
            _ => PathRule::None,
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathRule {
    None,
    Object,
    Prefix,
}

/// What went wrong, in an `Err` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorKind {
    /// No such object.
    NotFound = 1,
    /// `Put` in create mode on an existing object.
    AlreadyExists = 2,
    /// A range past the end of the object.
    OutOfRange = 3,
    /// The server's memory budget would be exceeded.
    Budget = 4,
    /// A malformed or out-of-order frame; the connection is closed.
    Protocol = 5,
    /// Authentication failed; the connection is closed.
    Auth = 6,
    /// An invalid path; the connection is closed.
    InvalidPath = 7,
    /// Something else failed on the server; the connection is closed.
    Internal = 8,
    /// A frame failed its tag (altered, replayed, reordered or dropped in
    /// transit); the connection is closed.
    Integrity = 9,
}

impl ErrorKind {
    /// Decodes an error kind.
    pub fn from_u16(v: u16) -> Option<ErrorKind> {
        Some(match v {
            1 => ErrorKind::NotFound,
            2 => ErrorKind::AlreadyExists,
            3 => ErrorKind::OutOfRange,
            4 => ErrorKind::Budget,
            5 => ErrorKind::Protocol,
            6 => ErrorKind::Auth,
            7 => ErrorKind::InvalidPath,
            8 => ErrorKind::Internal,
            9 => ErrorKind::Integrity,
            _ => return None,
        })
    }

    /// Whether the server keeps the connection open after this error.
    pub fn keeps_connection(self) -> bool {
        matches!(
            self,
            ErrorKind::NotFound
                | ErrorKind::AlreadyExists
                | ErrorKind::OutOfRange
                | ErrorKind::Budget
        )
    }
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad magic {0:02x?}, not a ckpt peer frame")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    BadVersion(u8),
    /// An opcode this version does not know.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A path longer than [`MAX_PATH`].
    #[error("path of {0} bytes is longer than {MAX_PATH}")]
    PathTooLong(u64),
    /// A path on an opcode that takes none.
    #[error("{0} takes no path")]
    UnexpectedPath(Opcode),
    /// An invalid object path or prefix.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path, lossily decoded.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A payload over the frame limit.
    #[error("{opcode} frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's opcode.
        opcode: Opcode,
        /// Declared payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A payload of the wrong length for its opcode.
    #[error("{opcode} frame has a payload of {len} bytes, expected {expected}")]
    BadPayloadLength {
        /// The frame's opcode.
        opcode: Opcode,
        /// Declared payload length.
        len: u64,
        /// What the opcode requires.
        expected: &'static str,
    },
    /// Flags that mean nothing for this opcode.
    #[error("{opcode} frame has invalid flags {flags:#06x}")]
    BadFlags {
        /// The frame's opcode.
        opcode: Opcode,
        /// The flags.
        flags: u16,
    },
    /// A payload whose content does not parse.
    #[error("malformed {opcode} payload: {reason}")]
    BadPayload {
        /// The frame's opcode.
        opcode: Opcode,
        /// What is wrong.
        reason: &'static str,
    },
    /// A frame that is valid but not allowed now.
    #[error("{opcode} frame not allowed {state}")]
    OutOfOrder {
        /// The frame's opcode.
        opcode: Opcode,
        /// The state it arrived in.
        state: &'static str,
    },
    /// A reply opcode where a request was expected, or the reverse.
    #[error("{0} frame sent the wrong way")]
    WrongDirection(Opcode),
    /// Fewer bytes than the header declares.
    #[error("truncated frame")]
    Truncated,
    /// A frame whose tag does not match: it was altered, replayed,
    /// reordered or dropped in transit (or the peer is broken).
    #[error(
        "{opcode} frame {seq} failed its tag check: altered, replayed, reordered or dropped in transit"
    )]
    BadTag {
        /// The frame's opcode (as its header claims).
        opcode: Opcode,
        /// The sequence number it was expected to have.
        seq: u64,
    },
    /// The server's proof does not verify: it does not hold the group
    /// secret, or the handshake was altered.
    #[error(
        "the server dialled as `{identity}` did not prove it holds the group secret for this session \
         (another secret, or not the peer server it claims to be)"
    )]
    BadServerProof {
        /// The identity the client dialled.
        identity: String,
    },
    /// The client's proof does not verify.
    #[error("the client did not prove it holds this server's secret for this session")]
    BadClientProof,
    /// The client dialled another server than this one.
    #[error(
        "the client dialled `{dialled}` but this server is `{identity}` \
         (relayed to the wrong server? else set the server's identity to the address clients list)"
    )]
    IdentityMismatch {
        /// The identity in the `ClientHello`.
        dialled: String,
        /// This server's identity.
        identity: String,
    },
    /// A payload that arrived slower than the server's minimum rate.
    #[error(
        "{opcode} payload of {len} bytes arrived slower than the minimum rate of {rate} bytes/s"
    )]
    TooSlow {
        /// The frame's opcode.
        opcode: Opcode,
        /// Its payload length.
        len: u64,
        /// The minimum rate, bytes per second.
        rate: u64,
    },
    /// The other end answered with an `Err` frame.
    #[error("refused ({kind:?}): {message}")]
    Remote {
        /// The error kind it sent.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
}

impl ProtocolError {
    /// The error kind a server reports for this rejection.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::PathTooLong(_) | ProtocolError::InvalidPath { .. } => {
                ErrorKind::InvalidPath
            }
            ProtocolError::BadTag { .. } => ErrorKind::Integrity,
            ProtocolError::BadServerProof { .. }
            | ProtocolError::BadClientProof
            | ProtocolError::IdentityMismatch { .. } => ErrorKind::Auth,
            ProtocolError::Remote { kind, .. } => *kind,
            _ => ErrorKind::Protocol,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame's kind.
    pub opcode: Opcode,
    /// Opcode-specific flags.
    pub flags: u16,
    /// Request id, echoed in the reply.
    pub request_id: u64,
    /// Length of the path that follows the header.
    pub path_len: u32,
    /// Length of the payload that follows the path.
    pub payload_len: u64,
}

impl Header {
    /// A header with no flags, path or payload.
    pub fn new(opcode: Opcode, request_id: u64) -> Self {
        Self {
            opcode,
            flags: 0,
            request_id,
            path_len: 0,
            payload_len: 0,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.opcode as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.path_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parses a header and checks what can be checked without the rest of
    /// the frame: magic, version, opcode, path length and whether the
    /// opcode takes a path. Payload limits are checked by
    /// [`Header::check_payload`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[0..4]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(ProtocolError::BadVersion(b[4]));
        }
        let opcode = Opcode::from_u8(b[5]).ok_or(ProtocolError::UnknownOpcode(b[5]))?;
        let mut r = &b[6..];
        let flags = r.get_u16_le();
        let request_id = r.get_u64_le();
        let path_len = r.get_u32_le();
        let payload_len = r.get_u64_le();
        if path_len as usize > MAX_PATH {
            return Err(ProtocolError::PathTooLong(u64::from(path_len)));
        }
        match opcode.path_rule() {
            PathRule::None if path_len != 0 => return Err(ProtocolError::UnexpectedPath(opcode)),
            PathRule::Object if path_len == 0 => {
                return Err(ProtocolError::InvalidPath {
                    path: String::new(),
                    reason: "empty",
                });
            }
            _ => {}
        }
        Ok(Header {
            opcode,
            flags,
            request_id,
            path_len,
            payload_len,
        })
    }

    /// Checks the declared payload length and the flags against what the
    /// opcode allows; `max_frame` bounds `Put`, `WriteChunk` and
    /// `Entries`. A `Data` payload is bounded by the caller, who knows what
    /// it asked for.
    pub fn check_payload(&self, max_frame: u64) -> Result<(), ProtocolError> {
        let len = self.payload_len;
        let exact = |n: u64, expected: &'static str| {
            if len == n {
                Ok(())
            } else {
                Err(ProtocolError::BadPayloadLength {
                    opcode: self.opcode,
                    len,
                    expected,
                })
            }
        };
        let at_most = |max: u64| {
            if len <= max {
                Ok(())
            } else {
                Err(ProtocolError::FrameTooLarge {
                    opcode: self.opcode,
                    len,
                    max,
                })
            }
        };
        let flags_ok = match self.opcode {
            Opcode::Put | Opcode::FinishWrite => self.flags <= 1,
            Opcode::Err => ErrorKind::from_u16(self.flags).is_some(),
            _ => self.flags == 0,
        };
        if !flags_ok {
            return Err(ProtocolError::BadFlags {
                opcode: self.opcode,
                flags: self.flags,
            });
        }
        match self.opcode {
            Opcode::ClientHello => {
                if len > NONCE_LEN as u64 && len <= (NONCE_LEN + MAX_IDENTITY) as u64 {
                    Ok(())
                } else {
                    Err(ProtocolError::BadPayloadLength {
                        opcode: self.opcode,
                        len,
                        expected: "33 to 287 (nonce and identity)",
                    })
                }
            }
            Opcode::Auth => exact(MAC_LEN as u64, "32 (proof)"),
            Opcode::Hello => exact((NONCE_LEN + MAC_LEN) as u64, "64 (nonce and proof)"),
            Opcode::GetRange => exact(16, "16 (start and end)"),
            Opcode::Get
            | Opcode::Size
            | Opcode::List
            | Opcode::Delete
            | Opcode::BeginWrite
            | Opcode::FinishWrite
            | Opcode::AbortWrite => exact(0, "0"),
            Opcode::Put | Opcode::WriteChunk | Opcode::Entries => at_most(max_frame),
            Opcode::Ok => at_most(MAX_OK_PAYLOAD as u64),
            Opcode::Err => at_most(MAX_MESSAGE as u64),
            Opcode::Data => Ok(()),
        }
    }

    /// Decodes and validates the path that follows this header.
    pub fn decode_path(&self, bytes: &[u8]) -> Result<String, ProtocolError> {
        let lossy = || String::from_utf8_lossy(bytes).into_owned();
        let s = std::str::from_utf8(bytes).map_err(|_| ProtocolError::InvalidPath {
            path: lossy(),
            reason: "not UTF-8",
        })?;
        match self.opcode.path_rule() {
            PathRule::None => {
                if s.is_empty() {
                    Ok(String::new())
                } else {
                    Err(ProtocolError::UnexpectedPath(self.opcode))
                }
            }
            PathRule::Object => validate_object_path(s).map(|()| s.to_string()),
            PathRule::Prefix => validate_prefix(s).map(|()| s.to_string()),
        }
    }
}

fn invalid(path: &str, reason: &'static str) -> ProtocolError {
    ProtocolError::InvalidPath {
        path: path.to_string(),
        reason,
    }
}

fn check_common(s: &str) -> Result<(), ProtocolError> {
    if s.len() > MAX_PATH {
        return Err(ProtocolError::PathTooLong(s.len() as u64));
    }
    if s.starts_with('/') {
        return Err(invalid(s, "absolute"));
    }
    if s.contains(['\0', '\\']) {
        return Err(invalid(s, "contains NUL or backslash"));
    }
    Ok(())
}

/// Checks an object path: relative, at most [`MAX_PATH`] bytes, no empty,
/// `.` or `..` component, no NUL or backslash.
pub fn validate_object_path(s: &str) -> Result<(), ProtocolError> {
    if s.is_empty() {
        return Err(invalid(s, "empty"));
    }
    check_common(s)?;
    for c in s.split('/') {
        match c {
            "" => return Err(invalid(s, "empty component")),
            "." | ".." => return Err(invalid(s, "`.` or `..` component")),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a listing prefix: like an object path, but it may be empty and
/// may end with `/`.
pub fn validate_prefix(s: &str) -> Result<(), ProtocolError> {
    check_common(s)?;
    let comps: Vec<&str> = s.split('/').collect();
    let last = comps.len().saturating_sub(1);
    for (i, c) in comps.iter().enumerate() {
        match *c {
            "" if i != last => return Err(invalid(s, "empty component")),
            "." | ".." => return Err(invalid(s, "`.` or `..` component")),
            _ => {}
        }
    }
    Ok(())
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The client's opening.
    ClientHello {
        /// The client's nonce.
        nonce: [u8; NONCE_LEN],
        /// The server address the client dialled, as in its configuration.
        identity: String,
    },
    /// The client's proof, sent after it checked the server's.
    Auth {
        /// `HMAC-SHA256(secret, "ckpt-peer-v2 client proof" || transcript)`.
        proof: [u8; MAC_LEN],
    },
    /// Store a small object.
    Put {
        /// Object path.
        path: String,
        /// Replace or create only.
        mode: PutMode,
        /// The object.
        data: Bytes,
    },
    /// Read a whole object.
    Get {
        /// Object path.
        path: String,
    },
    /// Read `start..end`.
    GetRange {
        /// Object path.
        path: String,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Size of an object.
    Size {
        /// Object path.
        path: String,
    },
    /// Objects whose path starts with `prefix`.
    List {
        /// The prefix.
        prefix: String,
    },
    /// Remove an object.
    Delete {
        /// Object path.
        path: String,
    },
    /// Open a streamed write.
    BeginWrite {
        /// Object path.
        path: String,
    },
    /// Append to the open write.
    WriteChunk {
        /// The bytes.
        data: Bytes,
    },
    /// Publish the open write.
    FinishWrite {
        /// Replace any existing object, or create only.
        mode: PutMode,
    },
    /// Drop the open write.
    AbortWrite,
}

impl Request {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::ClientHello { .. } => Opcode::ClientHello,
            Request::Auth { .. } => Opcode::Auth,
            Request::Put { .. } => Opcode::Put,
            Request::Get { .. } => Opcode::Get,
            Request::GetRange { .. } => Opcode::GetRange,
            Request::Size { .. } => Opcode::Size,
            Request::List { .. } => Opcode::List,
            Request::Delete { .. } => Opcode::Delete,
            Request::BeginWrite { .. } => Opcode::BeginWrite,
            Request::WriteChunk { .. } => Opcode::WriteChunk,
            Request::FinishWrite { .. } => Opcode::FinishWrite,
            Request::AbortWrite => Opcode::AbortWrite,
        }
    }

    fn path(&self) -> &str {
        match self {
            Request::Put { path, .. }
            | Request::Get { path }
            | Request::GetRange { path, .. }
            | Request::Size { path }
            | Request::Delete { path }
            | Request::BeginWrite { path } => path,
            Request::List { prefix } => prefix,
            _ => "",
        }
    }

    /// The frame, without its tag, split in two: header, path and any
    /// small payload; then the bulk payload (`Put` and `WriteChunk` data),
    /// sent as it is without copying.
    pub fn encode_parts(&self, request_id: u64) -> (Vec<u8>, Bytes) {
        let path = self.path().as_bytes();
        let mut small = BytesMut::new();
        let mut bulk = Bytes::new();
        let mut flags = 0;
        match self {
            Request::ClientHello { nonce, identity } => {
                small.put_slice(nonce);
                small.put_slice(identity.as_bytes());
            }
            Request::Auth { proof } => small.put_slice(proof),
            Request::Put { mode, data, .. } => {
                flags = put_mode_flag(*mode);
                bulk = data.clone();
            }
            Request::FinishWrite { mode } => flags = put_mode_flag(*mode),
            Request::GetRange { start, end, .. } => {
                small.put_u64_le(*start);
                small.put_u64_le(*end);
            }
            Request::WriteChunk { data } => bulk = data.clone(),
            _ => {}
        }
        let header = Header {
            opcode: self.opcode(),
            flags,
            request_id,
            path_len: path.len() as u32,
            payload_len: (small.len() + bulk.len()) as u64,
        };
        let mut head = Vec::with_capacity(HEADER_LEN + path.len() + small.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(path);
        head.extend_from_slice(&small);
        (head, bulk)
    }

    /// The whole frame, without its tag, in one buffer (tests and the
    /// handshake).
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let (mut head, bulk) = self.encode_parts(request_id);
        head.extend_from_slice(&bulk);
        head
    }

    /// Builds a request from a checked header, its path bytes and its
    /// payload.
    pub fn decode(header: &Header, path: &[u8], payload: Bytes) -> Result<Request, ProtocolError> {
        if !header.opcode.is_request() {
            return Err(ProtocolError::WrongDirection(header.opcode));
        }
        if path.len() as u64 != u64::from(header.path_len)
            || payload.len() as u64 != header.payload_len
        {
            return Err(ProtocolError::Truncated);
        }
        // Fixed-size payloads are checked here too, so the parsing below
        // never reads past the end; size limits are the caller's.
        header.check_payload(u64::MAX)?;
        let path = header.decode_path(path)?;
        let mut p = payload;
        Ok(match header.opcode {
            Opcode::ClientHello => {
                let mut nonce = [0u8; NONCE_LEN];
                p.copy_to_slice(&mut nonce);
                let identity = std::str::from_utf8(&p)
                    .map_err(|_| ProtocolError::BadPayload {
                        opcode: Opcode::ClientHello,
                        reason: "identity is not UTF-8",
                    })?
                    .to_string();
                Request::ClientHello { nonce, identity }
            }
            Opcode::Auth => {
                let mut proof = [0u8; MAC_LEN];
                p.copy_to_slice(&mut proof);
                Request::Auth { proof }
            }
            Opcode::Put => Request::Put {
                path,
                mode: put_mode_from_flag(header.flags).ok_or(ProtocolError::BadFlags {
                    opcode: Opcode::Put,
                    flags: header.flags,
                })?,
                data: p,
            },
            Opcode::Get => Request::Get { path },
            Opcode::GetRange => {
                let start = p.get_u64_le();
                let end = p.get_u64_le();
                if start > end {
                    return Err(ProtocolError::BadPayload {
                        opcode: Opcode::GetRange,
                        reason: "range start after its end",
                    });
                }
                Request::GetRange { path, start, end }
            }
            Opcode::Size => Request::Size { path },
            Opcode::List => Request::List { prefix: path },
            Opcode::Delete => Request::Delete { path },
            Opcode::BeginWrite => Request::BeginWrite { path },
            Opcode::WriteChunk => Request::WriteChunk { data: p },
            Opcode::FinishWrite => Request::FinishWrite {
                mode: put_mode_from_flag(header.flags).ok_or(ProtocolError::BadFlags {
                    opcode: Opcode::FinishWrite,
                    flags: header.flags,
                })?,
            },
            Opcode::AbortWrite => Request::AbortWrite,
            other => return Err(ProtocolError::WrongDirection(other)),
        })
    }

    /// Parses one whole frame from `buf` (header, path and payload all
    /// present; no tag), checking it like a server does. Returns the
    /// request id and the request.
    pub fn decode_frame(buf: &[u8], max_frame: u64) -> Result<(u64, Request), ProtocolError> {
        let head: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ProtocolError::Truncated)?;
        let header = Header::decode(head)?;
        header.check_payload(max_frame)?;
        let rest = &buf[HEADER_LEN..];
        let path_len = header.path_len as usize;
        let total = (path_len as u64).saturating_add(header.payload_len);
        if (rest.len() as u64) < total {
            return Err(ProtocolError::Truncated);
        }
        let path = &rest[..path_len];
        let payload = Bytes::copy_from_slice(&rest[path_len..total as usize]);
        Ok((header.request_id, Request::decode(&header, path, payload)?))
    }
}

/// The flag value of a put mode.
pub fn put_mode_flag(mode: PutMode) -> u16 {
    match mode {
        PutMode::Overwrite => 0,
        PutMode::Create => 1,
    }
}

/// The put mode of a flag value.
pub fn put_mode_from_flag(flags: u16) -> Option<PutMode> {
    match flags {
        0 => Some(PutMode::Overwrite),
        1 => Some(PutMode::Create),
        _ => None,
    }
}

/// Header (and small payload) of a reply. `Data` replies are followed by
/// their streamed payload.
pub fn encode_reply(opcode: Opcode, flags: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        opcode,
        flags,
        request_id,
        path_len: 0,
        payload_len: payload.len() as u64,
    };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header.encode());
    v.extend_from_slice(payload);
    v
}

/// The header of a `Data` reply of `len` bytes.
pub fn encode_data_header(request_id: u64, len: u64) -> [u8; HEADER_LEN] {
    Header {
        opcode: Opcode::Data,
        flags: 0,
        request_id,
        path_len: 0,
        payload_len: len,
    }
    .encode()
}

/// An `Err` reply; the message is cut to [`MAX_MESSAGE`] bytes.
pub fn encode_error(request_id: u64, kind: ErrorKind, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    encode_reply(
        Opcode::Err,
        kind as u16,
        request_id,
        &message.as_bytes()[..end],
    )
}

/// Encodes a listing as `Entries` payload records.
pub fn encode_entries(entries: &[ObjectMeta]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.iter().map(|e| 10 + e.path.len()).sum());
    for e in entries {
        v.put_u64_le(e.size);
        v.put_u16_le(e.path.len() as u16);
        v.put_slice(e.path.as_bytes());
    }
    v
}

/// Decodes an `Entries` payload, validating every path.
pub fn decode_entries(mut b: &[u8]) -> Result<Vec<ObjectMeta>, ProtocolError> {
    let bad = |reason| ProtocolError::BadPayload {
        opcode: Opcode::Entries,
        reason,
    };
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 10 {
            return Err(bad("truncated entry"));
        }
        let size = b.get_u64_le();
        let len = b.get_u16_le() as usize;
        if b.len() < len {
            return Err(bad("truncated path"));
        }
        let path = std::str::from_utf8(&b[..len]).map_err(|_| bad("path is not UTF-8"))?;
        validate_object_path(path)?;
        out.push(ObjectMeta {
            path: path.to_string(),
            size,
        });
        b.advance(len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::ClientHello {
                nonce: [9; NONCE_LEN],
                identity: "127.0.0.1:7070".into(),
            },
            Request::ClientHello {
                nonce: [9; NONCE_LEN],
                identity: "h".repeat(MAX_IDENTITY),
            },
            Request::Auth {
                proof: [7; MAC_LEN],
            },
            Request::Put {
                path: "run/step-1/MANIFEST.json".into(),
                mode: PutMode::Create,
                data: Bytes::from_static(b"{}"),
            },
            Request::Put {
                path: "a".into(),
                mode: PutMode::Overwrite,
                data: Bytes::new(),
            },
            Request::Get { path: "a/b".into() },
            Request::GetRange {
                path: "a/b".into(),
                start: 3,
                end: 1 << 40,
            },
            Request::Size { path: "x".into() },
            Request::List {
                prefix: String::new(),
            },
            Request::List {
                prefix: "run/".into(),
            },
            Request::List {
                prefix: "run/step-0".into(),
            },
            Request::Delete { path: "x/y".into() },
            Request::BeginWrite {
                path: "r/rank-0.safetensors".into(),
            },
            Request::WriteChunk {
                data: Bytes::from(vec![1u8; 5000]),
            },
            Request::FinishWrite {
                mode: PutMode::Overwrite,
            },
            Request::FinishWrite {
                mode: PutMode::Create,
            },
            Request::AbortWrite,
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for (i, req) in all_requests().into_iter().enumerate() {
            let id = 1000 + i as u64;
            let frame = req.encode(id);
            let (got_id, got) = Request::decode_frame(&frame, DEFAULT_MAX_FRAME)
                .unwrap_or_else(|e| panic!("{req:?}: {e}"));
            assert_eq!((got_id, &got), (id, &req));
            let (head, bulk) = req.encode_parts(id);
            assert_eq!([head, bulk.to_vec()].concat(), frame);
        }
    }

    #[test]
    fn replies_and_entries_round_trip() {
        let e = encode_error(5, ErrorKind::Budget, "over budget");
        let h = Header::decode(e[..HEADER_LEN].try_into().expect("header")).expect("decode");
        assert_eq!(
            (h.opcode, h.flags, h.request_id, h.payload_len),
            (Opcode::Err, ErrorKind::Budget as u16, 5, 11)
        );
        h.check_payload(DEFAULT_MAX_FRAME).expect("valid");
        assert_eq!(&e[HEADER_LEN..], b"over budget");
        // A long message is cut at a character boundary.
        let long = "é".repeat(MAX_MESSAGE);
        let e = encode_error(1, ErrorKind::Internal, &long);
        assert!(e.len() - HEADER_LEN <= MAX_MESSAGE);
        assert!(std::str::from_utf8(&e[HEADER_LEN..]).is_ok());

        let entries = vec![
            ObjectMeta {
                path: "r/step-1/MANIFEST.json".into(),
                size: 17,
            },
            ObjectMeta {
                path: "b".into(),
                size: u64::MAX,
            },
        ];
        assert_eq!(
            decode_entries(&encode_entries(&entries)).expect("entries"),
            entries
        );
        assert_eq!(decode_entries(&[]).expect("empty"), vec![]);
        let mut bad = encode_entries(&entries);
        bad.pop();
        assert!(matches!(
            decode_entries(&bad),
            Err(ProtocolError::BadPayload { .. })
        ));
        let evil = encode_entries(&[ObjectMeta {
            path: "../etc".into(),
            size: 1,
        }]);
        assert!(matches!(
            decode_entries(&evil),
            Err(ProtocolError::InvalidPath { .. })
        ));
        let d = encode_data_header(3, 1 << 40);
        let h = Header::decode(&d).expect("data");
        assert_eq!((h.opcode, h.payload_len), (Opcode::Data, 1 << 40));
        h.check_payload(MIN_MAX_FRAME)
            .expect("data is bounded by the caller");
    }

    fn header_bytes(f: impl FnOnce(&mut [u8; HEADER_LEN])) -> [u8; HEADER_LEN] {
        let mut h = Header::new(Opcode::Get, 1).encode();
        h[16..20].copy_from_slice(&1u32.to_le_bytes());
        f(&mut h);
        h
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let h = header_bytes(|h| h[0] = b'X');
        assert!(matches!(
            Header::decode(&h),
            Err(ProtocolError::BadMagic(_))
        ));
        // A version 1 peer is refused by its header.
        let h = header_bytes(|h| h[4] = 1);
        assert_eq!(Header::decode(&h), Err(ProtocolError::BadVersion(1)));
        for op in [0u8, 13, 0x7f, 0x85, 0xff] {
            let h = header_bytes(|h| h[5] = op);
            assert_eq!(Header::decode(&h), Err(ProtocolError::UnknownOpcode(op)));
        }
        let h = header_bytes(|h| h[16..20].copy_from_slice(&1025u32.to_le_bytes()));
        assert_eq!(Header::decode(&h), Err(ProtocolError::PathTooLong(1025)));
        let h = header_bytes(|h| h[16..20].copy_from_slice(&u32::MAX.to_le_bytes()));
        assert!(matches!(
            Header::decode(&h),
            Err(ProtocolError::PathTooLong(_))
        ));
        // A path where none is allowed, none where one is required.
        let h = header_bytes(|h| h[5] = Opcode::FinishWrite as u8);
        assert_eq!(
            Header::decode(&h),
            Err(ProtocolError::UnexpectedPath(Opcode::FinishWrite))
        );
        let h = header_bytes(|h| h[16..20].copy_from_slice(&0u32.to_le_bytes()));
        assert!(matches!(
            Header::decode(&h),
            Err(ProtocolError::InvalidPath { .. })
        ));
    }

    fn with_payload(op: Opcode, flags: u16, len: u64) -> Header {
        Header {
            opcode: op,
            flags,
            request_id: 0,
            path_len: 0,
            payload_len: len,
        }
    }

    #[test]
    fn payload_limits_are_checked_before_reading() {
        let max = DEFAULT_MAX_FRAME;
        // One TiB claimed: refused from the header alone.
        for op in [Opcode::Put, Opcode::WriteChunk, Opcode::Entries] {
            assert_eq!(
                with_payload(op, 0, 1 << 40).check_payload(max),
                Err(ProtocolError::FrameTooLarge {
                    opcode: op,
                    len: 1 << 40,
                    max
                })
            );
            with_payload(op, 0, max)
                .check_payload(max)
                .expect("at the limit");
        }
        for (op, good) in [
            (Opcode::Auth, 32),
            (Opcode::Hello, 64),
            (Opcode::GetRange, 16),
            (Opcode::Get, 0),
            (Opcode::Size, 0),
            (Opcode::List, 0),
            (Opcode::Delete, 0),
            (Opcode::BeginWrite, 0),
            (Opcode::FinishWrite, 0),
            (Opcode::AbortWrite, 0),
        ] {
            with_payload(op, 0, good).check_payload(max).expect("exact");
            for bad in [good + 1, 1 << 40] {
                assert!(matches!(
                    with_payload(op, 0, bad).check_payload(max),
                    Err(ProtocolError::BadPayloadLength { .. })
                ));
            }
        }
        for good in [33, 32 + MAX_IDENTITY as u64] {
            with_payload(Opcode::ClientHello, 0, good)
                .check_payload(max)
                .expect("nonce and identity");
        }
        for bad in [0, 32, 33 + MAX_IDENTITY as u64, 1 << 40] {
            assert!(matches!(
                with_payload(Opcode::ClientHello, 0, bad).check_payload(max),
                Err(ProtocolError::BadPayloadLength { .. })
            ));
        }
        assert!(matches!(
            with_payload(Opcode::Ok, 0, 65).check_payload(max),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            with_payload(Opcode::Err, 5, MAX_MESSAGE as u64 + 1).check_payload(max),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        // Flags.
        assert!(matches!(
            with_payload(Opcode::Put, 2, 0).check_payload(max),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            with_payload(Opcode::Get, 1, 0).check_payload(max),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            with_payload(Opcode::Err, 99, 0).check_payload(max),
            Err(ProtocolError::BadFlags { .. })
        ));
    }

    #[test]
    fn invalid_paths_are_rejected() {
        for p in [
            "/abs", "a/../b", "..", ".", "a/./b", "a//b", "a/", "a\\b", "a\0b",
        ] {
            assert!(validate_object_path(p).is_err(), "{p:?}");
        }
        assert!(validate_object_path(&"a".repeat(MAX_PATH + 1)).is_err());
        validate_object_path(&"a".repeat(MAX_PATH)).expect("at the limit");
        validate_object_path("run/step-00000000000000000001/rank-0.json").expect("layout path");
        for p in ["", "run/", "run/step-0", "a/b/"] {
            validate_prefix(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
        for p in ["/", "/a", "../", "a/../", "a//", "a/..", "a\0"] {
            assert!(validate_prefix(p).is_err(), "{p:?}");
        }
        // Through a whole frame: the path is checked on decode.
        let mut frame = Request::Get { path: "ab".into() }.encode(1);
        let at = HEADER_LEN;
        frame[at..at + 2].copy_from_slice(b"..");
        assert!(matches!(
            Request::decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(ProtocolError::InvalidPath { .. })
        ));
        frame[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
        assert!(matches!(
            Request::decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(ProtocolError::InvalidPath {
                reason: "not UTF-8",
                ..
            })
        ));
    }

    #[test]
    fn malformed_frames_are_rejected() {
        // Truncated: shorter than the header, or than the header declares.
        let frame = Request::Put {
            path: "p".into(),
            mode: PutMode::Overwrite,
            data: Bytes::from_static(b"hello"),
        }
        .encode(1);
        assert_eq!(
            Request::decode_frame(&frame[..10], DEFAULT_MAX_FRAME),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            Request::decode_frame(&frame[..frame.len() - 1], DEFAULT_MAX_FRAME),
            Err(ProtocolError::Truncated)
        );
        // A put larger than the frame limit.
        let big = Request::WriteChunk {
            data: Bytes::from(vec![0u8; MIN_MAX_FRAME as usize + 1]),
        }
        .encode(1);
        assert!(matches!(
            Request::decode_frame(&big, MIN_MAX_FRAME),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        // A reply sent as a request.
        let ok = encode_reply(Opcode::Ok, 0, 1, &[]);
        assert_eq!(
            Request::decode_frame(&ok, DEFAULT_MAX_FRAME),
            Err(ProtocolError::WrongDirection(Opcode::Ok))
        );
        // A backwards range.
        let mut r = Request::GetRange {
            path: "p".into(),
            start: 0,
            end: 0,
        }
        .encode(1);
        let at = HEADER_LEN + 1;
        r[at..at + 8].copy_from_slice(&9u64.to_le_bytes());
        assert!(matches!(
            Request::decode_frame(&r, DEFAULT_MAX_FRAME),
            Err(ProtocolError::BadPayload { .. })
        ));
        // Random garbage never panics and is always rejected.
        for n in 0..2000usize {
            let buf = ckpt_core::rng::pattern(n % 97, n as u64);
            assert!(Request::decode_frame(&buf, DEFAULT_MAX_FRAME).is_err());
        }
    }

    #[test]
    fn error_kinds_say_whether_the_connection_survives() {
        for v in 1..=9 {
            let k = ErrorKind::from_u16(v).expect("kind");
            assert_eq!(k as u16, v);
            assert_eq!(k.keeps_connection(), v <= 4);
        }
        assert_eq!(ErrorKind::from_u16(0), None);
        assert_eq!(ErrorKind::from_u16(10), None);
        assert_eq!(
            ProtocolError::BadTag {
                opcode: Opcode::Data,
                seq: 3
            }
            .kind(),
            ErrorKind::Integrity
        );
        assert_eq!(
            ProtocolError::PathTooLong(2000).kind(),
            ErrorKind::InvalidPath
        );
        assert_eq!(ProtocolError::BadVersion(9).kind(), ErrorKind::Protocol);
    }

    /// What the `peer_frame` fuzz target checks, on stable, in CI.
    fn frame_property(data: &[u8]) {
        if let Ok((id, req)) = Request::decode_frame(data, DEFAULT_MAX_FRAME) {
            let again = Request::decode_frame(&req.encode(id), DEFAULT_MAX_FRAME);
            assert!(
                again.as_ref().is_ok_and(|(i, r)| *i == id && *r == req),
                "{req:?} does not round-trip: {again:?}"
            );
        }
        if let Some(head) = data
            .get(..HEADER_LEN)
            .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
            && let Ok(h) = Header::decode(head)
        {
            let _ = h.check_payload(DEFAULT_MAX_FRAME);
            let _ = h.decode_path(&data[HEADER_LEN..]);
        }
        let _ = decode_entries(data);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1024, ..Default::default() })]

        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            frame_property(&bytes);
        }

        #[test]
        fn valid_frames_with_flipped_or_cut_bytes_never_panic(
            which in 0usize..64,
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let all = all_requests();
            let mut frame = all[which % all.len()].encode(7);
            // Unchanged, every valid frame round-trips.
            frame_property(&frame);
            for (at, b) in flips {
                let i = at.index(frame.len());
                frame[i] = b;
            }
            frame_property(&frame);
            frame.truncate(cut.index(frame.len() + 1));
            frame_property(&frame);
        }
    }
}
