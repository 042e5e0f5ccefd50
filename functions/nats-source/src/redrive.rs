//! `nats-source redrive`: dead letters back to the subject they came from.
//!
//! A dead letter is the original payload and headers, with the original's `Nats-*` headers
//! renamed `X-Original-Nats-*`, plus `Dlq-*` headers saying why and from where. A run reads the
//! DLQ stream in sequence order with `STREAM.MSG.GET` requests, not a consumer, so nothing is
//! left behind on the DLQ stream. It stops at the last sequence the stream had when the run
//! began: a message that fails again while the run goes on is dead-lettered past that point and
//! waits for the next run, rather than going round in circles. For each dead letter the filters
//! select, one after the other (so a subject's messages go back in the order they left):
//!
//! 1. [`rebuild`] the original: `X-Original-Nats-*` named `Nats-*` again, except the publish
//!    preconditions and instructions `Nats-Expected-*` and `Nats-Rollup`, which stay
//!    `X-Original-*` (checked against the stream as it was then, they would refuse the message
//!    now or purge the subject's newer messages); the dead letter's own `Nats-*` and `Dlq-*`
//!    headers dropped; [`REDRIVEN_FROM`] added;
//! 2. publish it to its `Dlq-Original-Subject` through JetStream and wait for the PubAck;
//! 3. delete the dead letter, by sequence.
//!
//! # The event keeps its id; the duplicate window
//!
//! The original `Nats-Msg-Id` is kept, so the source gives the redriven event the same CloudEvent
//! `id`: it is the same event delivered again, as a redelivery would be, and a function that
//! deduplicates by id still can (an attempt that was dead-lettered after its retries ran out may
//! have done its work before it timed out). The price: JetStream drops a message whose
//! `Nats-Msg-Id` it stored within the stream's duplicate window (2 minutes unless configured),
//! answering `duplicate: true`. Such a dead letter stays in the DLQ, and the run says so, with the
//! window and when it ends, and exits 1: nothing is dropped silently. A message without a
//! `Nats-Msg-Id` gets `redrive:{dlq_stream}:{dlq_seq}`: its event id was its stream position,
//! which a new copy does not keep anyway, and a stable id is what makes a rerun safe.
//!
//! # Running twice, or again after a crash
//!
//! A run that stops between the PubAck and the delete (crash, lost connection) leaves a dead
//! letter whose copy is stored already. The next run publishes it again with the same
//! `Nats-Msg-Id`; within the target's duplicate window JetStream answers `duplicate: true` with
//! the sequence of the copy it kept. When that copy carries this dead letter's [`REDRIVEN_FROM`],
//! or the id is this dead letter's own `redrive:` one, the earlier run stored it: the dead letter
//! is deleted and reported "stored by an earlier run". A second run after a complete one finds
//! nothing. A rerun after a crash *and* past the window stores a second copy, under the same id:
//! delivery stays at least once with a stable id, as everywhere in the source. On a work-queue
//! stream the first copy may be consumed and gone already; a duplicate of an original id whose
//! copy is gone cannot be told from the original and is reported as within the window (the safe
//! side: kept, not dropped).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, context::PublishErrorKind, message::StreamMessage, stream::RawMessageErrorKind,
};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use handler_kit::config::{Env, parse_duration};
use handler_kit::nats::NatsConfig;

use crate::config::subject_matches;

/// The command line, as `--help` prints it.
pub const USAGE: &str = "\
usage: nats-source redrive [OPTIONS]

Moves dead letters back to the subject they came from, with their original headers and
payload, in DLQ order; each is deleted from the DLQ once its stream has stored it again.

Options:
  --dlq-stream NAME      the DLQ stream (default: ${STREAM}_DLQ)
  --subject PATTERN      only original subjects matching PATTERN (NATS wildcards * and >)
  --reason TEXT          only dead letters whose Dlq-Reason contains TEXT (any case)
  --older-than DURATION  only dead letters at least DURATION old (500ms, 30s, 10m, 2h, 7d)
  --newer-than DURATION  only dead letters less than DURATION old
  --limit N              at most N dead letters (of those selected, oldest first)
  --dry-run              print what would be moved; change nothing
  --nats-url URL         the NATS server, or several comma-separated (default: $NATS_URL);
                         credentials and TLS come from NATS_*_FILE, as for the source
  -h, --help             print this text

Exit status: 0 when every selected dead letter was moved (or, with --dry-run, listed),
1 when some stayed in the DLQ (the summary says why) or the run failed, 64 on a usage error.
";

/// Added to a redriven message: the dead letter it came from, `{dlq_stream}:{dlq_seq}`. It tells
/// a rerun that a stored copy is its own, and stays on the message if it is dead-lettered again.
pub const REDRIVEN_FROM: &str = "Redriven-From";

/// `EX_USAGE`, as for a bad configuration.
const EXIT_USAGE: u8 = 64;

/// JetStream's deduplication header.
const MSG_ID: &str = "Nats-Msg-Id";

/// What the source's dead letters prefix the original's `Nats-*` headers with.
const ORIGINAL: &str = "X-Original-";

/// What went wrong in a redrive.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// The command line is wrong (every problem found).
    #[error("{}", .0.join("\n"))]
    Usage(Vec<String>),
    /// No connection to NATS.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL given, its credentials hidden.
        url: String,
        /// The client's error.
        detail: String,
    },
    /// The DLQ stream is missing or cannot be read.
    #[error("DLQ stream {stream}: {detail}")]
    DlqStream {
        /// Its name.
        stream: String,
        /// The server's error.
        detail: String,
    },
    /// A publish got no answer: whether the copy was stored is unknown, so the run stops rather
    /// than time out on every dead letter after it. A rerun recognises a stored copy.
    #[error("publishing {letter} to {subject}: {detail}; stopped there, run again")]
    Publish {
        /// `{dlq_stream}:{dlq_seq}`.
        letter: String,
        /// The original subject.
        subject: String,
        /// The client's error.
        detail: String,
    },
    /// The copy was stored but the dead letter not deleted; a rerun within the target's
    /// duplicate window deletes it.
    #[error("{letter} was stored again as {stored} but is still in the DLQ: {detail}")]
    Delete {
        /// `{dlq_stream}:{dlq_seq}`.
        letter: String,
        /// `{stream}:{seq}` of the copy.
        stored: String,
        /// The server's error.
        detail: String,
    },
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `--help`.
    Help,
    /// A redrive run.
    Redrive(Options),
}

/// A redrive run's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--dlq-stream` (default `{STREAM}_DLQ`, the DLQ stream the source creates).
    pub dlq_stream: String,
    /// `--nats-url` (default `NATS_URL`, as for the source).
    pub nats_url: String,
    /// Which dead letters.
    pub filter: Filter,
    /// `--limit`: at most this many selected dead letters, so a large DLQ can go back in steps.
    pub limit: Option<usize>,
    /// `--dry-run`: list, change nothing.
    pub dry_run: bool,
}

/// Which dead letters a run handles; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `--subject`: a NATS pattern the original subject must match.
    pub subject: Option<String>,
    /// `--reason`: text `Dlq-Reason` must contain, in any case (`422`, `gave up`).
    pub reason: Option<String>,
    /// `--older-than`: dead-lettered at least this long ago (leave the newest for later).
    pub older_than: Option<Duration>,
    /// `--newer-than`: dead-lettered less than this long ago (only what a recent fix covers).
    pub newer_than: Option<Duration>,
}

impl Filter {
    /// Whether a dead letter of `subject` with `reason`, stored in the DLQ at `stored`, is
    /// selected at `now`. One without a subject or reason fails a filter on it.
    pub fn selects(
        &self,
        subject: Option<&str>,
        reason: Option<&str>,
        stored: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> bool {
        let age = now
            .signed_duration_since(stored)
            .to_std()
            .unwrap_or_default();
        self.subject
            .as_deref()
            .is_none_or(|p| subject.is_some_and(|s| subject_matches(p, s)))
            && self.reason.as_deref().is_none_or(|text| {
                reason.is_some_and(|r| r.to_lowercase().contains(&text.to_lowercase()))
            })
            && self.older_than.is_none_or(|d| age >= d)
            && self.newer_than.is_none_or(|d| age < d)
    }
}

/// Reads the command line (without `redrive`); `env` gives `STREAM` and `NATS_URL`. Every
/// problem is reported at once.
pub fn parse(args: &[String], env: &dyn Env) -> Result<Command, RedriveError> {
    let mut problems = Vec::new();
    let (mut dlq_stream, mut nats_url, mut limit, mut dry_run) = (None, None, None, false);
    let mut filter = Filter::default();
    let duration = |flag: &str, raw: Option<String>, problems: &mut Vec<String>| {
        raw.and_then(|raw| {
            parse_duration(&raw)
                .map_err(|e| problems.push(format!("{flag}: {e}")))
                .ok()
        })
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let takes_value = matches!(
            flag,
            "--dlq-stream"
                | "--nats-url"
                | "--subject"
                | "--reason"
                | "--older-than"
                | "--newer-than"
                | "--limit"
        );
        if matches!(flag, "--help" | "--dry-run") && inline.is_some() {
            problems.push(format!("{flag} takes no value"));
            continue;
        }
        let value = if takes_value {
            let value = inline.or_else(|| rest.next().cloned());
            if value.is_none() {
                problems.push(format!("{flag} needs a value"));
            }
            value
        } else {
            None
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--dry-run" => dry_run = true,
            "--dlq-stream" => dlq_stream = value,
            "--nats-url" => nats_url = value,
            "--subject" => filter.subject = value,
            "--reason" => filter.reason = value,
            "--older-than" => filter.older_than = duration(flag, value, &mut problems),
            "--newer-than" => filter.newer_than = duration(flag, value, &mut problems),
            "--limit" => match value.map(|v| v.parse::<usize>()) {
                Some(Ok(n)) if n > 0 => limit = Some(n),
                Some(_) => problems.push("--limit needs a whole number above 0".into()),
                None => {}
            },
            other => problems.push(format!("unknown option {other:?}")),
        }
    }
    if let (Some(older), Some(newer)) = (filter.older_than, filter.newer_than)
        && older >= newer
    {
        problems
            .push("--older-than must be shorter than --newer-than, or nothing is selected".into());
    }
    let dlq_stream = dlq_stream.or_else(|| env.get("STREAM").map(|s| format!("{s}_DLQ")));
    if dlq_stream.is_none() {
        problems.push("--dlq-stream is required when STREAM is not set".into());
    }
    let nats_url = nats_url.or_else(|| env.get("NATS_URL"));
    if nats_url.is_none() {
        problems.push("--nats-url is required when NATS_URL is not set".into());
    }
    match (dlq_stream, nats_url) {
        (Some(dlq_stream), Some(nats_url)) if problems.is_empty() => {
            Ok(Command::Redrive(Options {
                dlq_stream,
                nats_url,
                filter,
                limit,
                dry_run,
            }))
        }
        _ => Err(RedriveError::Usage(problems)),
    }
}

/// The message a dead letter was, ready to publish again.
#[derive(Debug, Clone)]
pub struct Original {
    /// `Dlq-Original-Subject`.
    pub subject: String,
    /// The original headers, see the module docs.
    pub headers: HeaderMap,
    /// The original payload.
    pub payload: Bytes,
    /// Whether `Nats-Msg-Id` is this dead letter's own `redrive:` id (the original had none).
    own_id: bool,
}

/// Rebuilds the original message of `letter`, read from `dlq_stream`; `None` when it is no
/// dead letter (no `Dlq-Original-Subject`).
pub fn rebuild(dlq_stream: &str, letter: &StreamMessage) -> Option<Original> {
    let subject = letter.headers.get("Dlq-Original-Subject")?.to_string();
    let mut headers = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name: &str = name.as_ref();
        let Some(name) = original_name(name) else {
            continue;
        };
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    let own_id = !headers
        .iter()
        .any(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(MSG_ID));
    if own_id {
        headers.insert(
            MSG_ID,
            format!("redrive:{dlq_stream}:{}", letter.sequence).as_str(),
        );
    }
    headers.insert(
        REDRIVEN_FROM,
        format!("{dlq_stream}:{}", letter.sequence).as_str(),
    );
    Some(Original {
        subject,
        headers,
        payload: letter.payload.clone(),
        own_id,
    })
}

/// The name a dead letter's header had on the original, or `None` for the dead letter's own.
fn original_name(name: &str) -> Option<&str> {
    let starts = |s: &str, prefix: &str| {
        s.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    if starts(name, "Nats-") || starts(name, "Dlq-") {
        return None;
    }
    let Some(restored) = name
        .get(ORIGINAL.len()..)
        .filter(|_| starts(name, ORIGINAL))
    else {
        return Some(name);
    };
    let instruction = starts(restored, "Nats-Expected-") || starts(restored, "Nats-Rollup");
    Some(if starts(restored, "Nats-") && !instruction {
        restored
    } else {
        name
    })
}

/// Why a selected dead letter stayed in the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No `Dlq-Original-Subject`: not a dead letter the source wrote.
    NotADeadLetter,
    /// Nothing answered the publish: no stream stores the original subject any more.
    NoStream {
        /// The original subject.
        subject: String,
    },
    /// The target stream stored this `Nats-Msg-Id` within its duplicate window, and not from
    /// this dead letter: JetStream dropped the copy.
    DuplicateWindow {
        /// The original's `Nats-Msg-Id`.
        id: String,
        /// The stream that answered.
        stream: String,
        /// Its duplicate window.
        window: Duration,
        /// When the window ends for this id, if the copy it holds is still stored.
        until: Option<DateTime<Utc>>,
    },
    /// The stream refused the message.
    Refused(String),
}

impl Skip {
    /// The cause, as the summary counts it.
    fn cause(&self) -> &'static str {
        match self {
            Self::NotADeadLetter => "not a dead letter",
            Self::NoStream { .. } => "no stream stores the subject",
            Self::DuplicateWindow { .. } => "within a duplicate window",
            Self::Refused(_) => "refused by the stream",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotADeadLetter => write!(f, "not a dead letter (no Dlq-Original-Subject)"),
            Self::NoStream { subject } => write!(f, "no stream stores {subject}"),
            Self::DuplicateWindow {
                id,
                stream,
                window,
                until,
            } => {
                write!(
                    f,
                    "Nats-Msg-Id {id} is within the duplicate window of {stream} ({} s)",
                    window.as_secs()
                )?;
                if let Some(until) = until {
                    write!(
                        f,
                        " until {}",
                        until.to_rfc3339_opts(SecondsFormat::Secs, true)
                    )?;
                }
                write!(f, ", which would drop the copy; run again later")
            }
            Self::Refused(detail) => write!(f, "refused: {detail}"),
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Dead letters the filters selected (at most `--limit`).
    pub matched: usize,
    /// Moved back and deleted from the DLQ (with `--dry-run`: would be).
    pub moved: usize,
    /// Of `moved`, those whose copy an earlier run had stored (its delete did not happen).
    pub stored_earlier: usize,
    /// Left in the DLQ: (DLQ sequence, why).
    pub skipped: Vec<(u64, Skip)>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

impl Summary {
    /// Whether every selected dead letter was moved (or listed).
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            return write!(
                f,
                "matched {}, would move {} (dry run: nothing changed)",
                self.matched, self.moved
            );
        }
        write!(f, "matched {}, moved {}", self.matched, self.moved)?;
        if self.stored_earlier > 0 {
            write!(f, " ({} stored by an earlier run)", self.stored_earlier)?;
        }
        write!(f, ", skipped {}", self.skipped.len())?;
        let mut causes: Vec<(&str, usize)> = Vec::new();
        for (_, skip) in &self.skipped {
            match causes.iter_mut().find(|(cause, _)| *cause == skip.cause()) {
                Some((_, n)) => *n += 1,
                None => causes.push((skip.cause(), 1)),
            }
        }
        if !causes.is_empty() {
            let causes: Vec<String> = causes.iter().map(|(c, n)| format!("{n} {c}")).collect();
            write!(f, " ({})", causes.join(", "))?;
        }
        Ok(())
    }
}

/// How one dead letter ended.
enum Outcome {
    /// Stored again as `{stream}:{seq}`, and deleted from the DLQ.
    Moved {
        stored: String,
        earlier: bool,
    },
    Skipped(Skip),
}

/// The `nats-source redrive` command: parses `args`, connects, runs; lines and the summary go to
/// stdout, errors to stderr. Returns the exit status the usage text promises.
pub async fn command(args: &[String], env: &dyn Env) -> ExitCode {
    let options = match parse(args, env) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Redrive(options)) => options,
        Err(e) => {
            for problem in e.to_string().lines() {
                eprintln!("nats-source redrive: {problem}");
            }
            eprintln!("(`nats-source redrive --help` lists the options)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The credential and TLS files come from the environment, as for the source.
    let nats = match handler_kit::config::load(env, |r| NatsConfig::read_for(r, &options.nats_url))
    {
        Ok(nats) => nats,
        Err(e) => {
            for problem in &e.0 {
                eprintln!("nats-source redrive: {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let run = async {
        let client = nats
            .connect_options("nats-source-redrive")
            .connect(nats.servers())
            .await
            .map_err(|e| RedriveError::Connect {
                url: nats.shown_url().to_string(),
                detail: e.to_string(),
            })?;
        redrive(&client, &options, Utc::now(), &mut std::io::stdout()).await
    };
    match run.await {
        Ok(summary) if summary.is_complete() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nats-source redrive: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Redrives the dead letters `options` select, judging ages at `now`; prints a line per dead
/// letter and the summary to `out`.
pub async fn redrive(
    client: &async_nats::Client,
    options: &Options,
    now: DateTime<Utc>,
    out: &mut dyn Write,
) -> Result<Summary, RedriveError> {
    let js = jetstream::new(client.clone());
    let dlq_name = options.dlq_stream.as_str();
    let dlq_error = |detail: String| RedriveError::DlqStream {
        stream: dlq_name.to_string(),
        detail,
    };
    let dlq = js
        .get_stream(dlq_name)
        .await
        .map_err(|e| dlq_error(e.to_string()))?;
    let last = dlq.cached_info().state.last_sequence;
    let mut summary = Summary {
        dry_run: options.dry_run,
        ..Summary::default()
    };
    let mut windows = HashMap::new();
    let mut next = dlq.cached_info().state.first_sequence.max(1);
    while next <= last && options.limit.is_none_or(|limit| summary.matched < limit) {
        let letter = match dlq.get_first_raw_message_by_subject(">", next).await {
            Ok(letter) if letter.sequence <= last => letter,
            Ok(_) => break,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(dlq_error(format!("reading from sequence {next}: {e}"))),
        };
        next = letter.sequence + 1;
        let header = |name| letter.headers.get(name).map(|v| v.as_str());
        let (subject, reason) = (header("Dlq-Original-Subject"), header("Dlq-Reason"));
        if !options.filter.selects(subject, reason, letter.time, now) {
            continue;
        }
        summary.matched += 1;
        let id = format!("{dlq_name}:{}", letter.sequence);
        let label = format!("{id} -> {}", subject.unwrap_or("?"));
        let reason = reason.unwrap_or("(no Dlq-Reason)");
        let outcome = match rebuild(dlq_name, &letter) {
            None => Outcome::Skipped(Skip::NotADeadLetter),
            Some(_) if options.dry_run => {
                summary.moved += 1;
                let _ = writeln!(out, "would move {label}: {reason}");
                continue;
            }
            Some(original) => move_back(&js, &dlq, &letter, &id, &original, &mut windows).await?,
        };
        match outcome {
            Outcome::Moved { stored, earlier } => {
                summary.moved += 1;
                summary.stored_earlier += usize::from(earlier);
                let note = if earlier {
                    " (stored by an earlier run)"
                } else {
                    ""
                };
                let _ = writeln!(out, "moved {label} as {stored}{note}: {reason}");
            }
            Outcome::Skipped(skip) => {
                let _ = writeln!(out, "skipped {label}: {skip}");
                summary.skipped.push((letter.sequence, skip));
            }
        }
    }
    let _ = writeln!(out, "{summary}");
    Ok(summary)
}

/// Publishes `original`, waits for the PubAck, then deletes `letter` from the DLQ.
async fn move_back(
    js: &jetstream::Context,
    dlq: &jetstream::stream::Stream,
    letter: &StreamMessage,
    id: &str,
    original: &Original,
    windows: &mut HashMap<String, Duration>,
) -> Result<Outcome, RedriveError> {
    let published = match js
        .publish_with_headers(
            original.subject.clone(),
            original.headers.clone(),
            original.payload.clone(),
        )
        .await
    {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    let ack = match published {
        Ok(ack) => ack,
        Err(e) => {
            return match e.kind() {
                PublishErrorKind::StreamNotFound => Ok(Outcome::Skipped(Skip::NoStream {
                    subject: original.subject.clone(),
                })),
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    Err(RedriveError::Publish {
                        letter: id.to_string(),
                        subject: original.subject.clone(),
                        detail: e.to_string(),
                    })
                }
                _ => Ok(Outcome::Skipped(Skip::Refused(e.to_string()))),
            };
        }
    };
    let stored = format!("{}:{}", ack.stream, ack.sequence);
    if ack.duplicate {
        let copy = match js.get_stream_no_info(&ack.stream).await {
            Ok(stream) => stream.get_raw_message(ack.sequence).await.ok(),
            Err(_) => None,
        };
        let ours = original.own_id
            || copy.as_ref().and_then(|c| c.headers.get(REDRIVEN_FROM))
                == original.headers.get(REDRIVEN_FROM);
        if !ours {
            let window = duplicate_window(js, &ack.stream, windows).await;
            return Ok(Outcome::Skipped(Skip::DuplicateWindow {
                id: original
                    .headers
                    .get(MSG_ID)
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                stream: ack.stream,
                window,
                until: copy.map(|c| c.time + window),
            }));
        }
    }
    if let Err(e) = dlq.delete_message(letter.sequence).await {
        // Gone anyway (another run deleted it first) is what this one wanted.
        let gone = matches!(
            dlq.get_raw_message(letter.sequence).await,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound
        );
        if !gone {
            return Err(RedriveError::Delete {
                letter: id.to_string(),
                stored,
                detail: e.to_string(),
            });
        }
    }
    Ok(Outcome::Moved {
        stored,
        earlier: ack.duplicate,
    })
}

/// A stream's duplicate window, asked once per run (zero when it cannot be read).
async fn duplicate_window(
    js: &jetstream::Context,
    stream: &str,
    windows: &mut HashMap<String, Duration>,
) -> Duration {
    if let Some(window) = windows.get(stream) {
        return *window;
    }
    let window = match js.get_stream(stream).await {
        Ok(s) => s.cached_info().config.duplicate_window,
        Err(_) => Duration::ZERO,
    };
    windows.insert(stream.to_string(), window);
    window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    fn letter(headers: &[(&str, &str)]) -> StreamMessage {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, *value);
        }
        StreamMessage {
            subject: "dlq.WORK.work.a".into(),
            sequence: 7,
            headers: map,
            payload: Bytes::from_static(b"payload"),
            time: Utc::now(),
        }
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|v| v.as_str())
    }

    #[test]
    fn a_rebuilt_message_has_the_original_headers_and_none_of_the_dead_letters() {
        let letter = letter(&[
            ("Nats-Msg-Id", "dlq:WORK:3"),
            ("X-Original-Nats-Msg-Id", "m-1"),
            ("X-Original-Nats-TTL", "1h"),
            ("X-Original-Nats-Expected-Last-Sequence", "0"),
            ("X-Original-Nats-Rollup", "sub"),
            ("Content-Type", "application/json"),
            ("Trace-Note", "a"),
            ("Trace-Note", "b"),
            ("Dlq-Reason", "HTTP 422 Unprocessable Entity"),
            ("Dlq-Deliveries", "1"),
            ("Dlq-Original-Subject", "work.a"),
            ("Dlq-Original-Stream", "WORK"),
            ("Dlq-Original-Sequence", "3"),
            ("Dlq-Time", "2026-12-01T10:00:00Z"),
        ]);
        let original = rebuild("WORK_DLQ", &letter).expect("a dead letter");
        assert_eq!(original.subject, "work.a");
        assert_eq!(original.payload, Bytes::from_static(b"payload"));
        let h = &original.headers;
        assert_eq!(get(h, "Nats-Msg-Id"), Some("m-1"));
        assert_eq!(get(h, "Nats-TTL"), Some("1h"));
        assert_eq!(get(h, "Nats-Expected-Last-Sequence"), None);
        assert_eq!(get(h, "X-Original-Nats-Expected-Last-Sequence"), Some("0"));
        assert_eq!(get(h, "Nats-Rollup"), None);
        assert_eq!(get(h, "Content-Type"), Some("application/json"));
        let notes: Vec<&str> = h.get_all("Trace-Note").map(|v| v.as_str()).collect();
        assert_eq!(notes, ["a", "b"]);
        assert_eq!(get(h, REDRIVEN_FROM), Some("WORK_DLQ:7"));
        let names: Vec<String> = h.iter().map(|(n, _)| n.to_string()).collect();
        assert!(
            names.iter().all(|n| !n.to_lowercase().starts_with("dlq-")),
            "{names:?}"
        );
        assert!(!original.own_id);
    }

    #[test]
    fn a_message_without_an_id_gets_one_from_its_dead_letter() {
        let letter = letter(&[
            ("Nats-Msg-Id", "dlq:WORK:3"),
            ("Dlq-Original-Subject", "work.a"),
        ]);
        let original = rebuild("WORK_DLQ", &letter).expect("a dead letter");
        assert_eq!(
            get(&original.headers, "Nats-Msg-Id"),
            Some("redrive:WORK_DLQ:7")
        );
        assert!(original.own_id);
    }

    #[test]
    fn a_message_without_an_original_subject_is_no_dead_letter() {
        assert!(rebuild("WORK_DLQ", &letter(&[("Dlq-Reason", "x")])).is_none());
    }

    #[test]
    fn options_default_to_the_sources_environment() {
        let env = [("STREAM", "AI_TTS"), ("NATS_URL", "nats://n:4222")];
        let parsed = parse(&args(&["--dry-run", "--limit=3"]), &env).expect("valid");
        assert_eq!(
            parsed,
            Command::Redrive(Options {
                dlq_stream: "AI_TTS_DLQ".into(),
                nats_url: "nats://n:4222".into(),
                filter: Filter::default(),
                limit: Some(3),
                dry_run: true,
            })
        );
        let explicit = parse(
            &args(&[
                "--dlq-stream",
                "X",
                "--nats-url",
                "nats://m",
                "--older-than",
                "10m",
            ]),
            &env,
        );
        let Ok(Command::Redrive(o)) = explicit else {
            panic!("valid: {explicit:?}");
        };
        assert_eq!(
            (o.dlq_stream.as_str(), o.nats_url.as_str()),
            ("X", "nats://m")
        );
        assert_eq!(o.filter.older_than, Some(Duration::from_secs(600)));
        assert_eq!(parse(&args(&["-h"]), &env).expect("help"), Command::Help);
    }

    #[test]
    fn every_usage_problem_is_reported_at_once() {
        let no_env: [(&str, &str); 0] = [];
        let err = parse(
            &args(&[
                "--limit",
                "0",
                "--older-than",
                "5",
                "--bogus",
                "--dry-run=yes",
                "--reason",
            ]),
            &no_env,
        );
        let Err(RedriveError::Usage(problems)) = err else {
            panic!("a usage error: {err:?}");
        };
        // --limit, --older-than, --bogus, --dry-run=, --reason, and no stream, no URL.
        assert_eq!(problems.len(), 7, "{problems:?}");
        let crossed = parse(
            &args(&["--older-than", "1h", "--newer-than", "10m"]),
            &[("STREAM", "S"), ("NATS_URL", "n")],
        );
        assert!(matches!(crossed, Err(RedriveError::Usage(p)) if p.len() == 1));
    }

    #[test]
    fn filters_select_by_subject_reason_and_age() {
        let now = Utc::now();
        let minutes_ago = |m| now - chrono::Duration::minutes(m);
        let filter = Filter {
            subject: Some("work.tts.*".into()),
            reason: Some("unprocessable".into()),
            older_than: Some(Duration::from_secs(60)),
            newer_than: Some(Duration::from_secs(3600)),
        };
        let reason = Some("HTTP 422 Unprocessable Entity");
        assert!(filter.selects(Some("work.tts.a"), reason, minutes_ago(5), now));
        assert!(!filter.selects(Some("work.stt.a"), reason, minutes_ago(5), now));
        assert!(!filter.selects(Some("work.tts.a"), Some("HTTP 400"), minutes_ago(5), now));
        assert!(!filter.selects(Some("work.tts.a"), reason, now, now));
        assert!(!filter.selects(Some("work.tts.a"), reason, minutes_ago(61), now));
        assert!(!filter.selects(None, None, minutes_ago(5), now));
        assert!(Filter::default().selects(None, None, now, now));
    }

    #[test]
    fn the_summary_counts_what_stayed_by_cause() {
        let summary = Summary {
            matched: 4,
            moved: 2,
            stored_earlier: 1,
            skipped: vec![
                (
                    3,
                    Skip::NoStream {
                        subject: "a".into(),
                    },
                ),
                (
                    5,
                    Skip::NoStream {
                        subject: "b".into(),
                    },
                ),
            ],
            dry_run: false,
        };
        assert_eq!(
            summary.to_string(),
            "matched 4, moved 2 (1 stored by an earlier run), skipped 2 (2 no stream stores the subject)"
        );
        assert!(!summary.is_complete());
    }
}
