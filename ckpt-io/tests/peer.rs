//! Peer tier tests.
