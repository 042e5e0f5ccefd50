//! `nats-source redrive`: real dead letters (a sink answering 4xx) back to their subject, once,
//! and only those selected.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage, stream};
use chrono::{DateTime, Utc};
use nats_source::redrive::{self, REDRIVEN_FROM, Summary};
use testkit::nats_server::NatsServer;

use crate::support::{Sink, Source, drained, eventually};

/// JetStream's duplicate window when a stream names none.
const DEFAULT_WINDOW: Duration = Duration::from_secs(120);

/// A source on WORK (`work.>`) whose sink answers 422 (400 for ids starting `bad-request`)
/// while `refusing` is set, and 200 once it is cleared.
struct Rig {
    nats: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    sink: Sink,
    source: Option<Source>,
    refusing: Arc<AtomicBool>,
}

impl Rig {
    /// WORK is created here, for its duplicate window: the source keeps a stream that exists.
    async fn start(duplicate_window: Duration) -> Self {
        let nats = NatsServer::start().await.expect("nats");
        let client = nats.client().await.expect("client");
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: "WORK".into(),
            subjects: vec!["work.>".into()],
            duplicate_window,
            ..Default::default()
        })
        .await
        .expect("WORK");
        let refusing = Arc::new(AtomicBool::new(true));
        let refuse = refusing.clone();
        let sink = Sink::start(
            Arc::new(move |id: &str, _| {
                match (refuse.load(Ordering::SeqCst), id.starts_with("bad-request")) {
                    (false, _) => 200,
                    (true, true) => 400,
                    (true, false) => 422,
                }
            }),
            Duration::ZERO,
        );
        let source = Source::start(&nats.url(), &sink.url(), &[]);
        source.ready().await;
        Self {
            nats,
            client,
            js,
            sink,
            source: Some(source),
            refusing,
        }
    }

    fn accept(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Publishes a binary-mode CloudEvent `id` (no `Nats-Msg-Id`) on `subject`.
    async fn event(&self, subject: &str, id: &str) {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-source", "/test"),
            ("ce-type", "test.event"),
            ("Content-Type", "application/json"),
            ("Trace-Note", "kept"),
        ];
        self.publish(subject, &headers, &format!(r#"{{"id":"{id}"}}"#))
            .await;
    }

    async fn publish(&self, subject: &str, headers: &[(&str, &str)], payload: &str) {
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, *v);
        }
        self.js
            .publish_with_headers(subject.to_string(), map, payload.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// Publishes `evt-a` on `work.a` and `evt-b` on `work.b`, and returns their dead letters.
    async fn two_dead_letters(&self) -> Vec<StreamMessage> {
        self.event("work.a", "evt-a").await;
        self.event("work.b", "evt-b").await;
        let letters = self.settled().await;
        assert_eq!(letters.len(), 2, "both dead-lettered");
        letters
    }

    /// Waits until the source has settled everything, then returns the DLQ.
    async fn settled(&self) -> Vec<StreamMessage> {
        assert!(drained(&self.client, Duration::from_secs(20)).await);
        self.letters().await
    }

    async fn letters(&self) -> Vec<StreamMessage> {
        stored(&self.js, "WORK_DLQ", ">").await
    }

    /// Runs redrive in process with `STREAM=WORK`, judging ages at `now`.
    async fn redrive_at(&self, args: &[&str], now: DateTime<Utc>) -> (Summary, Vec<String>) {
        let args: Vec<String> = args.iter().map(ToString::to_string).collect();
        let url = self.nats.url();
        let env = [("STREAM", "WORK"), ("NATS_URL", url.as_str())];
        let redrive::Command::Redrive(options) = redrive::parse(&args, &env).expect("usage") else {
            panic!("not a run: {args:?}");
        };
        let mut out = Vec::new();
        let summary = redrive::redrive(&self.client, &options, now, &mut out)
            .await
            .expect("redrive ran");
        let out = String::from_utf8(out).expect("utf-8");
        (summary, out.lines().map(str::to_string).collect())
    }

    async fn redrive(&self, args: &[&str]) -> (Summary, Vec<String>) {
        self.redrive_at(args, Utc::now()).await
    }

    /// Runs the `nats-source` binary with `STREAM=WORK` and this server's `NATS_URL`.
    async fn cli(&self, args: &[&str]) -> Run {
        let url = self.nats.url();
        cli(args, &[("STREAM", "WORK"), ("NATS_URL", url.as_str())]).await
    }

    /// The copies redrive stored in WORK (they carry `Redriven-From`), on any subject.
    async fn copies(&self) -> Vec<StreamMessage> {
        stored(&self.js, "WORK", "work.>")
            .await
            .into_iter()
            .filter(|m| m.headers.get(REDRIVEN_FROM).is_some())
            .collect()
    }

    /// Ids the sink answered with `status`.
    fn answered(&self, status: u16) -> Vec<String> {
        let mut ids: Vec<String> = self
            .sink
            .log()
            .into_iter()
            .filter(|r| r.status == status)
            .map(|r| r.id)
            .collect();
        ids.sort();
        ids
    }

    async fn stop(mut self) {
        if let Some(source) = self.source.take() {
            source.stop().await;
        }
    }
}

/// The `nats-source` binary's exit status and output.
struct Run {
    status: Option<i32>,
    stdout: Vec<String>,
    stderr: String,
}

async fn cli(args: &[&str], env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Blocking, off the runtime, so the source in this test keeps delivering meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nats-source"))
            .args(&args)
            .env_remove("STREAM")
            .env_remove("NATS_URL")
            .envs(env)
            .output()
            .expect("nats-source runs")
    })
    .await
    .expect("joined");
    Run {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Every message of `stream` on `subject`, in order, read by sequence (no consumer).
async fn stored(js: &jetstream::Context, stream: &str, subject: &str) -> Vec<StreamMessage> {
    let Ok(stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(m) = stream.get_first_raw_message_by_subject(subject, next).await {
        next = m.sequence + 1;
        out.push(m);
    }
    out
}

fn header<'a>(m: &'a StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

/// The original subjects of the dead letters a run's lines name, in order.
fn subjects(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split(" -> ").nth(1))
        .filter_map(|rest| rest.split([':', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_redriven_event_goes_back_to_its_subject_and_reaches_a_sink_that_now_accepts_it() {
    let rig = Rig::start(DEFAULT_WINDOW).await;
    let letters = rig.two_dead_letters().await;
    let originals = stored(&rig.js, "WORK", "work.>").await;

    rig.accept();
    let run = rig.cli(&["redrive"]).await;
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let copies = rig.copies().await;
    assert_eq!(copies.len(), 2);
    let mut expected = Vec::new();
    for letter in &letters {
        let from = format!("WORK_DLQ:{}", letter.sequence);
        let copy = copies
            .iter()
            .find(|c| header(c, REDRIVEN_FROM) == Some(from.as_str()))
            .expect("a copy of each dead letter");
        let subject = header(letter, "Dlq-Original-Subject").expect("subject");
        assert_eq!(copy.subject.as_str(), subject);
        expected.push(format!(
            "moved {from} -> {subject} as WORK:{}: {}",
            copy.sequence,
            header(letter, "Dlq-Reason").expect("reason")
        ));
        // The original's headers and payload, nothing of the dead letter's.
        let original = originals
            .iter()
            .find(|o| o.subject.as_str() == subject)
            .expect("original");
        assert_eq!(copy.payload, original.payload);
        for (name, values) in original.headers.iter() {
            assert_eq!(copy.headers.get_all(name.clone()).count(), values.len());
            assert_eq!(copy.headers.get(name.clone()), values.first(), "{name}");
        }
        let names: Vec<String> = copy.headers.iter().map(|(n, _)| n.to_string()).collect();
        assert!(!names.iter().any(|n| n.starts_with("Dlq-")), "{names:?}");
    }
    expected.push("matched 2, moved 2, skipped 0".into());
    assert_eq!(run.stdout, expected);

    assert!(rig.settled().await.is_empty(), "the DLQ no longer has them");
    let delivered = eventually(Duration::from_secs(10), || async {
        let ids = rig.answered(200);
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(delivered, Some(vec!["evt-a".into(), "evt-b".into()]));
    let dlq = rig.js.get_stream("WORK_DLQ").await.expect("dlq");
    assert_eq!(
        dlq.cached_info().state.consumer_count,
        0,
        "no consumer left on the DLQ"
    );
    rig.stop().await;
}

#[tokio::test]
async fn an_event_within_its_duplicate_window_stays_in_the_dlq_until_the_window_has_passed() {
    let window = Duration::from_secs(5);
    let rig = Rig::start(window).await;
    let headers = [
        ("Nats-Msg-Id", "m-1"),
        ("Nats-Expected-Stream", "WORK"),
        ("Content-Type", "application/json"),
        ("Trace-Note", "kept"),
    ];
    rig.publish("work.plain", &headers, r#"{"plain":true}"#)
        .await;
    assert_eq!(rig.settled().await.len(), 1);
    rig.accept();

    // WORK still holds m-1 within its window: a copy would be dropped as a duplicate.
    let (summary, lines) = rig.redrive(&[]).await;
    assert!(!summary.is_complete());
    let prefix = "skipped WORK_DLQ:1 -> work.plain: Nats-Msg-Id m-1 is within the duplicate window of WORK (5 s) until ";
    assert!(lines[0].starts_with(prefix), "{lines:?}");
    assert!(lines[0].ends_with("run again later"), "{lines:?}");
    assert_eq!(
        lines[1],
        "matched 1, moved 0, skipped 1 (1 within a duplicate window)"
    );
    assert_eq!(rig.letters().await.len(), 1, "left in the DLQ");
    assert!(rig.copies().await.is_empty());

    let moved = eventually(window * 3, || async {
        let (summary, _) = rig.redrive(&[]).await;
        (summary.moved == 1).then_some(())
    })
    .await;
    assert!(moved.is_some(), "moved once the window had passed");
    let copies = rig.copies().await;
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(header(copy, "Nats-Msg-Id"), Some("m-1"));
    assert_eq!(header(copy, "Content-Type"), Some("application/json"));
    assert_eq!(header(copy, "Trace-Note"), Some("kept"));
    // A precondition of the first publish, not applied again.
    assert_eq!(header(copy, "Nats-Expected-Stream"), None);
    assert_eq!(
        header(copy, "X-Original-Nats-Expected-Stream"),
        Some("WORK")
    );
    assert_eq!(copy.payload.as_ref(), br#"{"plain":true}"#);
    let delivered = eventually(Duration::from_secs(10), || async {
        let ids = rig.answered(200);
        (!ids.is_empty()).then_some(ids)
    })
    .await;
    assert_eq!(
        delivered,
        Some(vec!["m-1".into()]),
        "delivered again under the same event id"
    );
    rig.stop().await;
}

#[tokio::test]
async fn filters_select_dead_letters_by_original_subject_reason_age_and_limit() {
    let rig = Rig::start(DEFAULT_WINDOW).await;
    rig.event("work.tts.old", "old-1").await;
    rig.event("work.stt.old", "bad-request-old").await;
    assert_eq!(rig.settled().await.len(), 2);
    let between = Utc::now();
    rig.event("work.tts.new", "new-1").await;
    rig.event("work.tts.bad", "bad-request-new").await;
    rig.event("work.stt.new", "new-2").await;
    let letters = rig.settled().await;
    assert_eq!(letters.len(), 5);
    let in_dlq_order = |wanted: &[&str]| -> Vec<String> {
        letters
            .iter()
            .filter_map(|l| header(l, "Dlq-Original-Subject"))
            .filter(|s| wanted.contains(s))
            .map(str::to_string)
            .collect()
    };

    // An hour after the first two were dead-lettered and before the other three.
    let later = between + chrono::Duration::hours(1);
    let selected = async |args: &[&str]| {
        let mut args = args.to_vec();
        args.push("--dry-run");
        let (summary, lines) = rig.redrive_at(&args, later).await;
        assert!(summary.is_complete());
        subjects(&lines)
    };
    assert_eq!(
        selected(&["--subject", "work.tts.>"]).await,
        in_dlq_order(&["work.tts.old", "work.tts.new", "work.tts.bad"])
    );
    assert_eq!(
        selected(&["--reason", "400"]).await,
        in_dlq_order(&["work.stt.old", "work.tts.bad"])
    );
    assert_eq!(
        selected(&["--older-than", "1h"]).await,
        in_dlq_order(&["work.tts.old", "work.stt.old"])
    );
    assert_eq!(
        selected(&["--newer-than", "1h"]).await,
        in_dlq_order(&["work.tts.new", "work.tts.bad", "work.stt.new"])
    );
    let first_two: Vec<String> = subjects(&rig.redrive_at(&["--dry-run"], later).await.1)
        .into_iter()
        .take(2)
        .collect();
    assert_eq!(selected(&["--limit", "2"]).await, first_two);
    assert_eq!(
        selected(&[
            "--subject",
            "work.tts.*",
            "--reason",
            "422",
            "--newer-than",
            "1h"
        ])
        .await,
        ["work.tts.new"]
    );

    rig.accept();
    let (summary, lines) = rig.redrive(&["--subject", "work.stt.*"]).await;
    assert_eq!(summary.moved, 2, "{lines:?}");
    assert_eq!(
        subjects(&lines),
        in_dlq_order(&["work.stt.old", "work.stt.new"])
    );
    let left: Vec<String> = rig
        .settled()
        .await
        .iter()
        .filter_map(|l| header(l, "Dlq-Original-Subject").map(str::to_string))
        .collect();
    assert_eq!(
        left,
        in_dlq_order(&["work.tts.old", "work.tts.new", "work.tts.bad"])
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_dry_run_lists_what_it_would_move_and_changes_nothing() {
    let rig = Rig::start(DEFAULT_WINDOW).await;
    let letters = rig.two_dead_letters().await;
    let work_before = stored(&rig.js, "WORK", "work.>").await.len();
    rig.accept();

    let run = rig.cli(&["redrive", "--dry-run"]).await;
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let mut expected: Vec<String> = letters
        .iter()
        .map(|l| {
            format!(
                "would move WORK_DLQ:{} -> {}: {}",
                l.sequence,
                header(l, "Dlq-Original-Subject").expect("subject"),
                header(l, "Dlq-Reason").expect("reason")
            )
        })
        .collect();
    expected.push("matched 2, would move 2 (dry run: nothing changed)".into());
    assert_eq!(run.stdout, expected);

    let sequences = |l: &[StreamMessage]| l.iter().map(|m| m.sequence).collect::<Vec<_>>();
    assert_eq!(sequences(&rig.letters().await), sequences(&letters));
    assert_eq!(stored(&rig.js, "WORK", "work.>").await.len(), work_before);
    assert!(rig.answered(200).is_empty());
    rig.stop().await;
}

#[tokio::test]
async fn running_twice_moves_nothing_the_second_time_and_stores_no_duplicates() {
    let rig = Rig::start(DEFAULT_WINDOW).await;
    rig.two_dead_letters().await;
    rig.accept();

    let (first, _) = rig.redrive(&[]).await;
    assert_eq!((first.matched, first.moved), (2, 2));
    assert!(rig.settled().await.is_empty());
    let (second, lines) = rig.redrive(&[]).await;
    assert!(second.is_complete());
    assert_eq!(lines, ["matched 0, moved 0, skipped 0"]);
    assert_eq!(rig.copies().await.len(), 2, "one copy each");
    assert_eq!(rig.answered(200), ["evt-a", "evt-b"], "delivered once each");
    rig.stop().await;
}

#[tokio::test]
async fn a_crash_between_publish_and_delete_stores_the_message_only_once() {
    // Short, so the original's id leaves it soon; long enough for the rerun to fall inside it.
    let window = Duration::from_secs(3);
    let rig = Rig::start(window).await;
    rig.event("work.no-id", "evt-crash").await;
    rig.publish("work.with-id", &[("Nats-Msg-Id", "m-crash")], "{}")
        .await;
    let letters = rig.settled().await;
    assert_eq!(letters.len(), 2);
    rig.accept();

    // The crashed run: each copy stored, no dead letter deleted.
    for letter in &letters {
        let original = redrive::rebuild("WORK_DLQ", letter).expect("a dead letter");
        let stored = eventually(window * 3, || async {
            let ack = rig
                .js
                .publish_with_headers(
                    original.subject.clone(),
                    original.headers.clone(),
                    original.payload.clone(),
                )
                .await
                .expect("publish")
                .await
                .expect("acked");
            // A duplicate of the original itself while its id is within the window.
            (!ack.duplicate).then_some(())
        })
        .await;
        assert!(stored.is_some(), "copy of {} stored", letter.sequence);
    }

    let (summary, lines) = rig.redrive(&[]).await;
    assert!(summary.is_complete(), "{lines:?}");
    assert_eq!((summary.moved, summary.stored_earlier), (2, 2), "{lines:?}");
    assert!(
        lines[..2]
            .iter()
            .all(|l| l.contains("(stored by an earlier run)")),
        "{lines:?}"
    );
    assert!(rig.settled().await.is_empty());
    assert_eq!(rig.copies().await.len(), 2, "one copy each, not two");
    assert_eq!(rig.answered(200), ["evt-crash", "m-crash"]);
    rig.stop().await;
}

#[tokio::test]
async fn a_subject_no_stream_stores_any_more_is_left_in_the_dlq_and_the_run_fails() {
    let mut rig = Rig::start(DEFAULT_WINDOW).await;
    rig.event("work.gone", "evt-gone").await;
    assert_eq!(rig.settled().await.len(), 1);
    if let Some(source) = rig.source.take() {
        source.stop().await;
    }
    // The stream moves on to other subjects.
    let work = rig.js.get_stream("WORK").await.expect("WORK");
    work.delete_consumer("worker")
        .await
        .expect("consumer deleted");
    let mut config = work.cached_info().config.clone();
    config.subjects = vec!["kept.>".into()];
    rig.js.update_stream(config).await.expect("WORK updated");

    let run = rig.cli(&["redrive"]).await;
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        [
            "skipped WORK_DLQ:1 -> work.gone: no stream stores work.gone",
            "matched 1, moved 0, skipped 1 (1 no stream stores the subject)",
        ]
    );
    assert_eq!(rig.letters().await.len(), 1, "left in the DLQ");
    rig.stop().await;
}

#[tokio::test]
async fn events_refused_again_are_dead_lettered_anew_and_not_redriven_twice_in_one_run() {
    let rig = Rig::start(DEFAULT_WINDOW).await;
    let count = 50;
    for n in 0..count {
        rig.event(&format!("work.again.{n}"), &format!("evt-{n}"))
            .await;
    }
    let first = rig.settled().await;
    assert_eq!(first.len(), count);

    // The sink still refuses: copies come back to the DLQ while the run goes on, past the
    // sequence it started with, and wait for the next run.
    let (summary, lines) = rig.redrive(&[]).await;
    assert_eq!(
        (summary.matched, summary.moved),
        (count, count),
        "{lines:?}"
    );
    let again = rig.settled().await;
    assert_eq!(again.len(), count, "each dead-lettered once more");
    let last_first = first.last().expect("letters").sequence;
    for letter in &again {
        assert!(letter.sequence > last_first);
        let from = header(letter, REDRIVEN_FROM).expect("where it was redriven from");
        let original = first
            .iter()
            .find(|l| format!("WORK_DLQ:{}", l.sequence) == from)
            .expect("one of the first dead letters");
        assert_eq!(
            header(letter, "Dlq-Original-Subject"),
            header(original, "Dlq-Original-Subject")
        );
        assert_eq!(
            header(letter, "X-Original-Nats-Msg-Id"),
            Some(format!("redrive:{from}").as_str()),
            "the id it was given stays with it"
        );
    }
    rig.stop().await;
}

#[tokio::test]
async fn usage_errors_exit_64_and_help_prints_the_usage() {
    let bad = cli(&["redrive", "--bogus", "--limit", "none"], &[]).await;
    assert_eq!(bad.status, Some(64));
    for problem in [
        "unknown option \"--bogus\"",
        "--limit needs a whole number above 0",
        "--dlq-stream is required when STREAM is not set",
        "--nats-url is required when NATS_URL is not set",
    ] {
        assert!(bad.stderr.contains(problem), "{problem}: {}", bad.stderr);
    }
    let help = cli(&["redrive", "--help"], &[]).await;
    assert_eq!(help.status, Some(0));
    assert_eq!(help.stdout.join("\n") + "\n", redrive::USAGE);
    let unknown = cli(&["redriv"], &[]).await;
    assert_eq!(unknown.status, Some(64));
    assert!(
        unknown.stderr.contains("unknown command"),
        "{}",
        unknown.stderr
    );
}
