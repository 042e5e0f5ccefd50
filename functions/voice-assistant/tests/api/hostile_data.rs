//! Audio whose MessagePack length prefix claims 4 GiB is a quick 400 that reserves nothing on
//! the prefix's word: the process's peak virtual size (`VmPeak`, which a 4 GiB reservation
//! raises even though it touches no page) stays where it was.

use std::time::{Duration, Instant};

use crate::voice::app;

/// The process's peak virtual memory size (`VmPeak` in `/proc/self/status`), in bytes.
fn peak_virtual_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPeak");
    kib * 1024
}

#[tokio::test]
async fn audio_claiming_4_gib_is_a_quick_400_that_reserves_nothing() {
    // STT, TTS, embeddings and the LLM all on one wiremock without mocks: any call shows.
    let backends = wiremock::MockServer::start().await;
    let app = app(&backends.uri(), &backends.uri(), None).await;
    let audio_field = [0x81, 0xa5, b'a', b'u', b'd', b'i', b'o'];
    for (what, prefix) in [
        (
            "an array32 of 4 Gi byte values",
            [0xdd, 0xff, 0xff, 0xff, 0xff],
        ),
        ("a bin32 of 4 GiB", [0xc6, 0xff, 0xff, 0xff, 0xff]),
    ] {
        let data = [&audio_field[..], &prefix[..]].concat();
        let request = testkit::cloudevent::event("ai.voice.request")
            .raw("application/msgpack", data)
            .binary();
        let before = peak_virtual_bytes();
        let started = Instant::now();
        let answer = testkit::cloudevent::send(&app, request).await;
        let took = started.elapsed();
        let grew = peak_virtual_bytes() - before;
        testkit::cloudevent::assert_error(&answer, 400, "invalid_payload");
        eprintln!("{what}: 400 in {took:?}, VmPeak grew {grew} bytes");
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
        // Other tests' threads and allocator arenas may raise it meanwhile, by far less.
        assert!(grew < 1 << 30, "{what}: VmPeak grew {grew} bytes");
    }
    let calls = backends
        .received_requests()
        .await
        .expect("wiremock records requests");
    assert!(
        calls.is_empty(),
        "hostile audio reached a backend: {calls:?}"
    );
}
