//! Session streaming over a real nats-server: utterances close on silence, any replica can take
//! the next chunk, redeliveries are ignored, gaps are retried.

use std::time::Duration;

use audio::{Wav, encode_pcm16, resample};
use futures::StreamExt as _;
use serde_json::json;
use testkit::nats_server::NatsServer;

use crate::recording::b64;
use crate::support::{app, assert_error, event, send, simulator};

/// The 16 kHz fixture cut into 400 ms WAV chunks.
fn chunks() -> Vec<Vec<u8>> {
    let wav = Wav::parse(&testkit::fixtures::speech("two-utterances-16k.wav")).expect("fixture");
    let samples = resample(&wav.to_mono_i16(), wav.sample_rate(), 16_000);
    samples
        .chunks(16_000 * 400 / 1000)
        .map(|c| encode_pcm16(c, 16_000).expect("encode"))
        .collect()
}

fn chunk_event(
    session: &str,
    seq: usize,
    audio: &[u8],
    last: bool,
) -> http::Request<axum::body::Body> {
    event("ai.stt.chunk")
        .id(&format!("{session}-{seq}"))
        .json(&json!({"session_id": session, "seq": seq, "audio": b64(audio), "final": last}))
        .binary()
}

async fn transcripts(sub: &mut async_nats::Subscriber, expected: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < expected {
        let msg = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("transcript in time")
            .expect("open");
        out.push(rmp_serde::from_slice(&msg.payload).expect("msgpack transcript"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_the_bucket_transcribe_like_one() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let sim = simulator().await;
    let env = [("NATS_URL", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let one = app(&sim, &env).await;
    let other = app(&sim, &env).await;
    let pieces = chunks();
    let last = pieces.len() - 1;

    let mut solo = client
        .subscribe("ai.stt.transcript.solo")
        .await
        .expect("sub");
    let mut duo = client
        .subscribe("ai.stt.transcript.duo")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    for (seq, audio) in pieces.iter().enumerate() {
        let a = send(&one, chunk_event("solo", seq, audio, seq == last)).await;
        assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
        // Alternate replicas: each must pick up the state the other left in the KV bucket.
        let replica = if seq % 2 == 0 { &one } else { &other };
        let b = send(replica, chunk_event("duo", seq, audio, seq == last)).await;
        assert_eq!(b.status, 202, "{}", String::from_utf8_lossy(&b.body));
    }
    let solo = transcripts(&mut solo, 2).await;
    let duo = transcripts(&mut duo, 2).await;
    for (s, d) in solo.iter().zip(&duo) {
        assert_eq!(s["text"], d["text"]);
        assert_eq!(s["start_ms"], d["start_ms"]);
        assert_eq!(s["end_ms"], d["end_ms"]);
    }
    assert_eq!(solo[0]["utterance_seq"], 0);
    assert_eq!(solo[1]["utterance_seq"], 1);
    let (end, next) = (solo[0]["end_ms"].as_u64(), solo[1]["start_ms"].as_u64());
    assert!(
        end.zip(next).is_some_and(|(end, next)| end < next),
        "{end:?} then {next:?}"
    );
    assert!(
        solo[0]["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("simulated transcript of")
    );
}

#[tokio::test]
async fn redelivered_chunks_are_ignored_and_gaps_are_retried() {
    let nats = NatsServer::start().await.expect("nats");
    let url = nats.url();
    let app = app(&simulator().await, &[("NATS_URL", url.as_str())]).await;
    let pieces = chunks();
    let first = send(&app, chunk_event("s1", 0, &pieces[0], false)).await;
    assert_eq!(first.status, 202);
    assert_eq!(first.json()["duplicate"], false);
    let again = send(&app, chunk_event("s1", 0, &pieces[0], false)).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["duplicate"], true);
    let gap = send(&app, chunk_event("s1", 2, &pieces[2], false)).await;
    assert_error(&gap, 409, "conflict");
    let next = send(&app, chunk_event("s1", 1, &pieces[1], false)).await;
    assert_eq!(next.status, 202);
    let bad = send(&app, chunk_event("not a valid id!", 0, &pieces[0], false)).await;
    assert_error(&bad, 422, "unprocessable");
}

#[tokio::test]
async fn sessions_without_nats_are_refused_clearly() {
    let app = app(&simulator().await, &[]).await;
    let answer = send(&app, chunk_event("s", 0, &chunks()[0], false)).await;
    assert_error(&answer, 422, "unprocessable");
    assert!(
        answer.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("NATS_URL")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_chunk_is_skipped_and_the_session_goes_on() {
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let url = nats.url();
    let app = app(&simulator().await, &[("NATS_URL", url.as_str())]).await;
    let mut sub = client
        .subscribe("ai.stt.transcript.gap")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let pieces = chunks();
    let last = pieces.len() - 1;

    let first = send(&app, chunk_event("gap", 0, &pieces[0], false)).await;
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    // Bad audio: final (dead-lettered), and so is its redelivery; neither blocks the session.
    for _ in 0..2 {
        let bad = send(&app, chunk_event("gap", 1, b"not audio", false)).await;
        assert_error(&bad, 422, "unprocessable");
    }
    let mut utterances = 0;
    for (seq, audio) in pieces.iter().enumerate().skip(2) {
        let answer = send(&app, chunk_event("gap", seq, audio, seq == last)).await;
        assert_eq!(
            answer.status,
            202,
            "seq {seq}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["duplicate"], false);
        utterances = answer.json()["utterances"].as_u64().expect("utterances");
    }
    assert!(utterances >= 1, "the rest of the session was transcribed");
    let published = transcripts(&mut sub, usize::try_from(utterances).expect("small")).await;
    for (i, t) in published.iter().enumerate() {
        assert_eq!(t["utterance_seq"], i as u64);
        assert!(
            t["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with("simulated transcript of"),
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_chunk_never_loses_an_utterance_to_dedupe() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    // A stream with JetStream's duplicate window, as a consumer of transcripts would have.
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "TRANSCRIPTS".into(),
            subjects: vec!["ai.stt.transcript.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");

    // The first attempt: the first utterance has no words, the second does, the third fails
    // (retryably). The retry: every utterance has words.
    let stt = wiremock::MockServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/audio/transcriptions"))
        .respond_with(move |_: &wiremock::Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => wiremock::ResponseTemplate::new(200).set_body_json(json!({"text": ""})),
                1 => wiremock::ResponseTemplate::new(200)
                    .set_body_json(json!({"text": "utterance 1"})),
                2 => wiremock::ResponseTemplate::new(500),
                n => wiremock::ResponseTemplate::new(200)
                    .set_body_json(json!({"text": format!("utterance {}", n - 3)})),
            }
        })
        .mount(&stt)
        .await;
    let url = nats.url();
    let app = app(&stt.uri(), &[("NATS_URL", url.as_str())]).await;

    // The recording twice over: four utterances closed by one final chunk.
    let wav = Wav::parse(&testkit::fixtures::speech("two-utterances-16k.wav")).expect("fixture");
    let once = resample(&wav.to_mono_i16(), wav.sample_rate(), 16_000);
    let twice = encode_pcm16(&[once.clone(), once].concat(), 16_000).expect("encode");
    let failed = send(&app, chunk_event("retry", 0, &twice, true)).await;
    assert_error(&failed, 502, "backend_error");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let retried = send(&app, chunk_event("retry", 0, &twice, true)).await;
    assert_eq!(
        retried.status,
        202,
        "{}",
        String::from_utf8_lossy(&retried.body)
    );
    let utterances = calls.load(Ordering::SeqCst) - 3;
    assert!(utterances >= 3, "{utterances} utterances");
    assert_eq!(retried.json()["utterances"], utterances as u64);

    // Every utterance is in the stream exactly once, whatever order the attempts left.
    let stored = testkit::cloudevent::eventually(Duration::from_secs(10), || {
        let js = js.clone();
        async move {
            let stream = js.get_stream("TRANSCRIPTS").await.ok()?;
            let n = stream.cached_info().state.messages;
            (n >= utterances as u64).then_some(n)
        }
    })
    .await
    .expect("transcripts stored");
    assert_eq!(stored, utterances as u64, "no copies, nothing lost");
    let mut seen = Vec::new();
    for seq in 1..=stored {
        let raw = stream.get_raw_message(seq).await.expect("stored message");
        let t: serde_json::Value = rmp_serde::from_slice(&raw.payload).expect("msgpack");
        let n = t["utterance_seq"].as_u64().expect("utterance_seq");
        assert_eq!(t["text"], format!("utterance {n}"), "{t}");
        seen.push(n);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..utterances as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_never_arrives_is_lost_after_the_gap_timeout_and_the_session_goes_on() {
    const GAP_MS: u64 = 2_000;
    let nats = NatsServer::start().await.expect("nats");
    let client = nats.client().await.expect("client");
    let env = [
        ("NATS_URL", nats.url()),
        ("STT_SESSION_GAP_MS", GAP_MS.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = app(&simulator().await, &env).await;
    let mut sub = client
        .subscribe("ai.stt.transcript.lost")
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    // seq 1..=20: the fixture in 400 ms chunks, then silence; the last one final.
    let mut pieces = chunks();
    let silence = encode_pcm16(&[0; 6_400], 16_000).expect("encode");
    pieces.resize(20, silence);

    // seq 0 cannot even be read: refused before the session knows of it, so it never comes.
    let unreadable = send(
        &app,
        event("ai.stt.chunk")
            .id("lost-0")
            .raw(
                "application/json",
                br#"{"session_id": "lost", "seq": 0, "audio": "#.to_vec(),
            )
            .binary(),
    )
    .await;
    assert_error(&unreadable, 400, "invalid_payload");

    // seq 1 waits for it, answered 409 (the source retries) until the gap timeout.
    let waiting = std::time::Instant::now();
    let early = send(&app, chunk_event("lost", 1, &pieces[0], false)).await;
    assert_error(&early, 409, "conflict");
    // Meanwhile a one-shot request is answered at once: the waiting session holds nothing.
    let one_shot = send(
        &app,
        event("ai.stt.request")
            .id("one-shot")
            .json(&json!({"audio": crate::recording::b64(&testkit::fixtures::speech("two-utterances-16k.wav"))}))
            .binary(),
    )
    .await;
    assert_eq!(
        one_shot.status,
        200,
        "{}",
        String::from_utf8_lossy(&one_shot.body)
    );
    let answered_in = waiting.elapsed();
    let still = send(&app, chunk_event("lost", 1, &pieces[0], false)).await;
    if waiting.elapsed() < Duration::from_millis(GAP_MS) {
        assert_error(&still, 409, "conflict");
        assert!(answered_in < Duration::from_millis(GAP_MS));
    }
    // The source's retries of seq 1, until the session gives up on seq 0.
    let accepted = testkit::cloudevent::eventually(Duration::from_secs(30), || async {
        let answer = send(&app, chunk_event("lost", 1, &pieces[0], false)).await;
        (answer.status == 202).then(|| answer.json())
    })
    .await
    .expect("seq 1 taken once the gap timed out");
    assert!(
        waiting.elapsed() >= Duration::from_millis(GAP_MS),
        "taken after {:?}, before STT_SESSION_GAP_MS",
        waiting.elapsed()
    );
    assert_eq!(accepted["skipped_total"], 1, "{accepted}");

    let mut utterances = 0;
    for seq in 2..=20 {
        let answer = send(&app, chunk_event("lost", seq, &pieces[seq - 1], seq == 20)).await;
        assert_eq!(
            answer.status,
            202,
            "seq {seq}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["duplicate"], false);
        utterances = answer.json()["utterances"].as_u64().expect("utterances");
    }
    assert_eq!(utterances, 2, "both sentences of the fixture");
    let published = transcripts(&mut sub, 2).await;
    // The first transcript after the loss says so; the next has nothing new to report.
    assert_eq!(
        published[0]["skipped_seqs"],
        json!([[0, 0]]),
        "{}",
        published[0]
    );
    assert_eq!(published[0]["skipped_total"], 1);
    assert_eq!(published[1]["skipped_seqs"], json!([]), "{}", published[1]);
    assert_eq!(published[1]["skipped_total"], 1);
    for t in &published {
        assert!(
            t["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with("simulated transcript of"),
            "{t}"
        );
    }
    // seq 0, should it turn up after all, is behind the session: a duplicate.
    let late = send(&app, chunk_event("lost", 0, &pieces[0], false)).await;
    assert_eq!(late.status, 202);
    assert_eq!(late.json()["duplicate"], true);
}
