//! Fuzzes the peer protocol's frame and handshake parsers: every frame a
//! peer server reads (the `ClientHello` and `Auth` of the handshake
//! included) comes off the network. Parsing must never panic, and a frame
//! that parses must encode back to one that parses to the same request.

#![no_main]

use ckpt_io::peer::protocol::{DEFAULT_MAX_FRAME, HEADER_LEN, Header, Request, decode_entries};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, req)) = Request::decode_frame(data, DEFAULT_MAX_FRAME) {
        let again = Request::decode_frame(&req.encode(id), DEFAULT_MAX_FRAME);
        assert!(
            again.as_ref().is_ok_and(|(i, r)| *i == id && *r == req),
            "{req:?} does not round-trip: {again:?}"
        );
    }
    if let Some(head) = data.get(..HEADER_LEN).and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok()) {
        if let Ok(h) = Header::decode(head) {
            let _ = h.check_payload(DEFAULT_MAX_FRAME);
            let _ = h.decode_path(&data[HEADER_LEN..]);
        }
    }
    let _ = decode_entries(data);
});
