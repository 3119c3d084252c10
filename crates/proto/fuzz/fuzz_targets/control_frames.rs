//! Arbitrary bytes through the control-stream decoder, whole and split at every chunk size the input picks.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxyfleet_proto::{ControlFrame, Decode, Encode, FrameCodec, MAX_CONTROL_FRAME};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut codec = FrameCodec::<ControlFrame>::new(MAX_CONTROL_FRAME);
    let mut buf = BytesMut::new();
    'outer: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    // Whatever decodes must re-encode to something that decodes to the same value.
                    let mut out = BytesMut::new();
                    frame.encode(&mut out);
                    assert_eq!(ControlFrame::decode_exact(&out).ok(), Some(frame));
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    let _ = ControlFrame::decode_exact(data);
});
