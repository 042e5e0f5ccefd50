//! Peak memory of one recording at the body cap, on the real binary: a request keeps its body
//! and the 16 kHz audio made of it, and little else, whatever the format it came in.
//!
//! Measured as the process's peak resident set (`VmHWM`, reset through `/proc/PID/clear_refs`
//! after a warm-up request) above its resident set before the request, for the formats that
//! cost most per byte of body: 8-bit (four times its size as 32-bit samples, which is how it
//! used to be decoded), stereo, and 44.1 or 48 kHz, which must be resampled; in a MessagePack
//! `bin` and as base64 in JSON. Each case runs its own process, so no case sees another's
//! memory. The bound, 2.5 times the body, leaves room for the extractor's moment of two copies
//! of the body and for the allocator's slack; what each case took is printed for the record.

use std::time::Duration;

use testkit::cloudevent::{EventBuilder, eventually};

use crate::support::simulator;

/// stt-module's default `MAX_BODY_BYTES`.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The real binary on a free port, killed on drop.
struct Process {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Process {
    async fn start(stt_url: &str) -> Self {
        let port = testkit::nats_server::free_port().expect("port");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stt-module"))
            .env_clear()
            .env("PORT", port.to_string())
            .env("STT_URL", stt_url)
            .env("EVENT_TIMEOUT_MS", "300000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start stt-module");
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: handler_kit::http::client(Duration::from_secs(300)).expect("client"),
        };
        let up = eventually(Duration::from_secs(20), || async {
            let r = process
                .http
                .get(format!("{}/readyz", process.base))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(up.is_some(), "stt-module never became ready");
        process
    }

    /// `VmRSS` or `VmHWM` in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc status"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("a number of kB");
        kib * 1024
    }

    /// Sends `event` in binary mode; returns the status and the answer, asked for in JSON.
    async fn send(&self, event: EventBuilder) -> (u16, serde_json::Value) {
        let (headers, body) = event.binary_parts();
        let mut request = self
            .http
            .post(&self.base)
            .header("accept", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("answered");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).expect("JSON answer"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn speech_16k() -> Vec<i16> {
    let wav = testkit::fixtures::speech("two-utterances-16k.wav");
    testkit::wav::samples_i16(&wav).expect("16-bit mono fixture")
}

/// `{"audio": bin 32}` in MessagePack, `wav` inside.
fn msgpack_body(wav: &[u8]) -> Vec<u8> {
    let mut body = vec![0x81, 0xa5];
    body.extend_from_slice(b"audio");
    body.push(0xc6);
    body.extend_from_slice(&u32::try_from(wav.len()).expect("small").to_be_bytes());
    body.extend_from_slice(wav);
    body
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Msgpack,
    JsonBase64,
}

/// Sends one recording of `rate`, `channels` and `bits` as large as the body cap allows in
/// `encoding`; checks the transcript and returns (body bytes, peak bytes above the start).
async fn peak_of_one_request(
    encoding: Encoding,
    rate: u32,
    channels: u16,
    bits: u16,
) -> (usize, u64) {
    let sim = simulator().await;
    let process = Process::start(&sim).await;
    let speech = speech_16k();
    // Warm-up: the runtime, the HTTP client and the first allocations are not the request's.
    let small = testkit::fixtures::speech("two-utterances-16k.wav");
    let (status, _) = process
        .send(
            testkit::cloudevent::event("ai.stt.request")
                .raw("application/msgpack", msgpack_body(&small)),
        )
        .await;
    assert_eq!(status, 200);

    let data_bytes = match encoding {
        // The map, its key and the bin32 prefix take 12 bytes; the header 44.
        Encoding::Msgpack => MAX_BODY_BYTES - 12 - 44,
        // `{"audio":""}` is 12 bytes; base64 takes 4 for every 3.
        Encoding::JsonBase64 => (MAX_BODY_BYTES - 12) / 4 * 3 - 44,
    };
    let wav = testkit::wav::tiled_speech_wav(&speech, rate, channels, bits, data_bytes);
    let frames = (wav.len() - 44) / usize::from(channels * bits / 8);
    let audio_ms = frames as u64 * 1000 / u64::from(rate);
    let event = match encoding {
        Encoding::Msgpack => testkit::cloudevent::event("ai.stt.request")
            .id("big")
            .raw("application/msgpack", msgpack_body(&wav)),
        Encoding::JsonBase64 => {
            use base64::Engine as _;
            let audio = base64::engine::general_purpose::STANDARD.encode(&wav);
            testkit::cloudevent::event("ai.stt.request")
                .id("big")
                .raw("application/json", format!(r#"{{"audio":"{audio}"}}"#))
        }
    };
    drop(wav);
    let body_len = event.binary_parts().1.len();
    assert!(body_len <= MAX_BODY_BYTES, "{body_len}");
    assert!(body_len > MAX_BODY_BYTES - 64, "{body_len}");

    // Resets VmHWM to the current resident set (Linux, as root or the process's owner).
    std::fs::write(format!("/proc/{}/clear_refs", process.child.id()), "5").expect("clear_refs");
    let before = process.status_bytes("VmRSS:");
    let (status, answer) = process.send(event).await;
    let peak = process.status_bytes("VmHWM:");
    assert_eq!(status, 200, "{answer}");
    // The answer is the whole recording's: its length, and speech found all along it.
    let got_ms = answer["audio_ms"].as_u64().expect("audio_ms");
    assert!(got_ms.abs_diff(audio_ms) <= 1, "{got_ms} vs {audio_ms}");
    let segments = answer["segments"].as_array().expect("segments");
    // The fixture holds two utterances every 7.5 s.
    let tiles = audio_ms / 7_500;
    assert!(
        segments.len() as u64 >= tiles,
        "{} segments in {audio_ms} ms",
        segments.len()
    );
    let last_end = segments
        .last()
        .and_then(|s| s["end_ms"].as_u64())
        .expect("end");
    assert!(
        last_end + 8_000 > audio_ms,
        "speech up to {last_end} of {audio_ms} ms"
    );
    assert!(!answer["text"].as_str().unwrap_or_default().is_empty());
    (body_len, peak.saturating_sub(before))
}

async fn assert_bounded(encoding: Encoding, rate: u32, channels: u16, bits: u16) {
    let (body, peak) = peak_of_one_request(encoding, rate, channels, bits).await;
    let ratio = peak as f64 / body as f64;
    eprintln!(
        "{encoding:?} {bits}-bit {channels} ch {rate} Hz: body {body} bytes, peak {peak} bytes \
         above the start, {ratio:.2}x the body"
    );
    assert!(
        ratio <= 2.5,
        "{encoding:?} {bits}-bit {channels} ch {rate} Hz: peak {peak} bytes is {ratio:.2}x the \
         body of {body}"
    );
}

#[tokio::test]
async fn eight_bit_stereo_44k_in_msgpack_at_the_cap_peaks_under_two_and_a_half_bodies() {
    assert_bounded(Encoding::Msgpack, 44_100, 2, 8).await;
}

#[tokio::test]
async fn sixteen_bit_stereo_48k_in_msgpack_at_the_cap_peaks_under_two_and_a_half_bodies() {
    assert_bounded(Encoding::Msgpack, 48_000, 2, 16).await;
}

#[tokio::test]
async fn eight_bit_stereo_44k_as_base64_json_at_the_cap_peaks_under_two_and_a_half_bodies() {
    assert_bounded(Encoding::JsonBase64, 44_100, 2, 8).await;
}

#[tokio::test]
async fn eight_bit_mono_48k_as_base64_json_at_the_cap_peaks_under_two_and_a_half_bodies() {
    // 8-bit mono is the densest audio per byte: 24 MiB of it is 524 s, near the 600 s limit.
    assert_bounded(Encoding::JsonBase64, 48_000, 1, 8).await;
}
