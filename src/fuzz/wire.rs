//! The harness of the `wire_frames` fuzz target: a byte stream (frames the
//! harness encodes and raw bytes, `frames.rs`) read frame by frame as a
//! peer's connection is read, each frame decoded as a request (what a
//! server does) and as a response (what a client does). What it checks:
//! nothing panics, and every message that decodes encodes to a frame that
//! decodes to the same message.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::frames::items;
use crate::net::proto::msg::{Request, Response};
use crate::net::proto::{read_frame, Frame, MAX_PAYLOAD};

/// Read `data`'s stream of frames and decode each.
pub fn wire_frames(data: &[u8]) {
    let mut stream = Vec::new();
    for (id, item) in items(data).iter().enumerate() {
        stream.extend_from_slice(&item.bytes(id as u64));
    }
    // The whole stream as one buffer, as `Frame::decode` sees it.
    if let Ok(f) = Frame::decode(&stream, MAX_PAYLOAD) {
        decode(&f);
    }
    let mut rest = &stream[..];
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        // Reading from a slice never waits: one poll finishes the read.
        let read = pin!(read_frame(&mut rest, MAX_PAYLOAD)).poll(&mut cx);
        match read {
            Poll::Ready(Ok(Some(f))) => decode(&f),
            Poll::Ready(Ok(None) | Err(_)) => break,
            Poll::Pending => unreachable!("a read from a slice waited"),
        }
    }
}

/// Decode `f` both ways; what decodes must survive its own encoding.
fn decode(f: &Frame) {
    if let Ok(r) = Request::from_frame(f) {
        let again = Request::from_frame(&r.to_frame(f.request_id));
        assert!(again.as_ref().ok() == Some(&r), "{r:?} does not round-trip");
    }
    if let Ok(r) = Response::from_frame(f) {
        let again = Response::from_frame(&r.to_frame(f.request_id));
        assert!(again.as_ref().ok() == Some(&r), "{r:?} does not round-trip");
    }
}
