//! The cryptography of a peer session: the handshake transcript, the two
//! proofs, the per-direction frame keys and the frame tags. The exact
//! constructions are specified in [`protocol`](super::protocol).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::protocol::{
    CLIENT_PROOF_LABEL, CLIENT_TO_SERVER_KEY_CONTEXT, MAC_LEN, MAX_IDENTITY, NONCE_LEN,
    SERVER_PROOF_LABEL, SERVER_TO_CLIENT_KEY_CONTEXT, TAG_LEN, VERSION,
};

/// What both proofs and both frame keys are bound to: the protocol
/// version, both nonces and the identity the client dialled.
pub(crate) struct Transcript {
    bytes: Vec<u8>,
}

impl Transcript {
    /// `version || client nonce || server nonce || identity length (u16) ||
    /// identity`. The identity is at most [`MAX_IDENTITY`] bytes (checked
    /// by both ends before this is built).
    pub(crate) fn new(
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        identity: &str,
    ) -> Self {
        debug_assert!(identity.len() <= MAX_IDENTITY);
        let mut bytes = Vec::with_capacity(1 + 2 * NONCE_LEN + 2 + identity.len());
        bytes.push(VERSION);
        bytes.extend_from_slice(client_nonce);
        bytes.extend_from_slice(server_nonce);
        bytes.extend_from_slice(&(identity.len() as u16).to_le_bytes());
        bytes.extend_from_slice(identity.as_bytes());
        Self { bytes }
    }

    fn hmac(&self, secret: &[u8], label: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(label);
        m.update(&self.bytes);
        m
    }

    /// The server's proof, sent first.
    pub(crate) fn server_proof(&self, secret: &[u8]) -> [u8; MAC_LEN] {
        self.hmac(secret, SERVER_PROOF_LABEL)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the server's proof in constant time.
    pub(crate) fn verify_server_proof(&self, secret: &[u8], proof: &[u8]) -> bool {
        self.hmac(secret, SERVER_PROOF_LABEL)
            .verify_slice(proof)
            .is_ok()
    }

    /// The client's proof, sent once the server's has been checked.
    pub(crate) fn client_proof(&self, secret: &[u8]) -> [u8; MAC_LEN] {
        self.hmac(secret, CLIENT_PROOF_LABEL)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the client's proof in constant time.
    pub(crate) fn verify_client_proof(&self, secret: &[u8], proof: &[u8]) -> bool {
        self.hmac(secret, CLIENT_PROOF_LABEL)
            .verify_slice(proof)
            .is_ok()
    }

    /// The frame keys of this session: `(client to server, server to
    /// client)`.
    pub(crate) fn frame_keys(&self, secret: &[u8]) -> ([u8; 32], [u8; 32]) {
        let mut material = Vec::with_capacity(8 + secret.len() + self.bytes.len());
        material.extend_from_slice(&(secret.len() as u64).to_le_bytes());
        material.extend_from_slice(secret);
        material.extend_from_slice(&self.bytes);
        let keys = (
            blake3::derive_key(CLIENT_TO_SERVER_KEY_CONTEXT, &material),
            blake3::derive_key(SERVER_TO_CLIENT_KEY_CONTEXT, &material),
        );
        // The material holds the secret: do not leave it in freed memory
        // longer than needed.
        material.fill(0);
        keys
    }
}

/// One direction of a session: its key and the sequence number of the
/// next frame.
pub(crate) struct FrameKey {
    key: [u8; 32],
    seq: u64,
}

impl FrameKey {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self { key, seq: 0 }
    }

    /// Starts the tag of the next frame in this direction; the caller
    /// feeds it the header, the path and the payload.
    pub(crate) fn next(&mut self) -> Tagger {
        let seq = self.seq;
        self.seq += 1;
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&seq.to_le_bytes());
        Tagger { h, seq }
    }
}

/// The tag of one frame, computed as its bytes go by.
pub(crate) struct Tagger {
    h: blake3::Hasher,
    seq: u64,
}

impl Tagger {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
    }

    /// This frame's sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn finish(&self) -> [u8; TAG_LEN] {
        *self.h.finalize().as_bytes()
    }

    /// Checks a received tag in constant time.
    pub(crate) fn verify(&self, tag: &[u8; TAG_LEN]) -> bool {
        self.h.finalize() == *tag
    }
}

/// The two directions of an established session, from one end's side.
pub(crate) struct Session {
    /// Frames this end sends.
    pub(crate) send: FrameKey,
    /// Frames this end receives.
    pub(crate) recv: FrameKey,
}

impl Session {
    /// The client's side of the session of `transcript`.
    pub(crate) fn client(transcript: &Transcript, secret: &[u8]) -> Self {
        let (c2s, s2c) = transcript.frame_keys(secret);
        Self {
            send: FrameKey::new(c2s),
            recv: FrameKey::new(s2c),
        }
    }

    /// The server's side of the session of `transcript`.
    pub(crate) fn server(transcript: &Transcript, secret: &[u8]) -> Self {
        let (c2s, s2c) = transcript.frame_keys(secret);
        Self {
            send: FrameKey::new(s2c),
            recv: FrameKey::new(c2s),
        }
    }
}

/// 32 random bytes from the operating system.
pub(crate) fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    use std::io::Read;
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn proofs_are_bound_to_secret_nonces_identity_and_direction() {
        let (a, b) = (nonce().expect("nonce"), nonce().expect("nonce"));
        assert_ne!(a, b);
        let t = Transcript::new(&a, &b, "127.0.0.1:7000");
        let p = t.server_proof(SECRET);
        assert!(t.verify_server_proof(SECRET, &p));
        assert!(!t.verify_server_proof(b"0123456789abcdef0123456789abcdeF", &p));
        assert!(!t.verify_server_proof(SECRET, &p[..31]));
        // The other direction's proof, or another session's, fails.
        assert!(!t.verify_client_proof(SECRET, &p));
        for other in [
            Transcript::new(&b, &a, "127.0.0.1:7000"),
            Transcript::new(&a, &b, "127.0.0.1:7001"),
            Transcript::new(&a, &a, "127.0.0.1:7000"),
        ] {
            assert!(!other.verify_server_proof(SECRET, &p));
        }
        let c = t.client_proof(SECRET);
        assert!(t.verify_client_proof(SECRET, &c));
        assert_ne!(c, p);
    }

    #[test]
    fn frame_tags_depend_on_key_sequence_and_bytes() {
        let t = Transcript::new(&[1; 32], &[2; 32], "h:1");
        let mut client = Session::client(&t, SECRET);
        let mut server = Session::server(&t, SECRET);
        let tag_of = |k: &mut FrameKey, bytes: &[u8]| {
            let mut g = k.next();
            g.update(bytes);
            g.finish()
        };
        // Same key and sequence on both ends.
        let sent = tag_of(&mut client.send, b"frame zero");
        let mut got = server.recv.next();
        got.update(b"frame ");
        got.update(b"zero");
        assert!(got.verify(&sent));
        // The next frame with the old tag (a replay) fails.
        let mut replay = server.recv.next();
        replay.update(b"frame zero");
        assert!(!replay.verify(&sent));
        // A reflected frame (server to client key) fails.
        assert_ne!(tag_of(&mut server.send, b"frame zero"), sent);
        // A changed byte fails.
        let sent = tag_of(&mut client.send, b"frame two");
        let mut got = server.recv.next();
        got.update(b"frame twp");
        assert!(!got.verify(&sent));
    }
}
