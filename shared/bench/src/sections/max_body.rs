//! The max-body section: each function's peak memory for ONE request with a body at its
//! default `MAX_BODY_BYTES`, a valid one that does the whole work.
//!
//! This is the per-request worst case the Knative manifests size their memory limits with
//! (`limit >= idle + containerConcurrency x peak`, see knative/README.md). For every function,
//! in a fresh process:
//!
//! 1. start it, answer one ordinary sample event (connection pools and lazy state exist, as in
//!    the idle RSS measurement), wait [`IDLE_SETTLE`], read `VmRSS` (idle);
//! 2. reset the peak (`echo 5 > /proc/<pid>/clear_refs` sets `VmHWM` to the current RSS);
//! 3. send the max-size event on a fresh connection, require 200 and a reply that shows the
//!    work was done (a transcript with speech, audio, an answer, a created run);
//! 4. read `VmHWM`: peak over idle = `VmHWM - idle`, and its ratio to the body's size;
//! 5. send a body one byte over the cap and require 413, which proves the cap used is the
//!    function's own default (a changed default fails the run instead of measuring the wrong
//!    size).
//!
//! `BENCH_MAX_BODY_CAPS=stt-module=16777216,...` measures a function at another cap instead
//! (set as its `MAX_BODY_BYTES`), e.g. the one its manifests set.
//!
//! Then each function is held to its manifests (knative/<function>/service.yaml and
//! config.yaml, see [`Manifest`]): idle + `containerConcurrency` x the worst request must fit
//! the memory limit, the worst request being the measured peak over idle scaled to the
//! manifests' `MAX_BODY_BYTES` where they set one (the memory a body costs grows with it).
//!
//! The bodies (see [`case`]):
//! - tts-module: a text of `TTS_MAX_TEXT_CHARS` (5000) characters, the rest of the cap JSON
//!   whitespace: the text is what costs (its audio), the body only has to be buffered;
//! - chat-handler: a message of `CHAT_MAX_MESSAGE_CHARS` (8000) characters and history turns
//!   filling the cap (history has no limit of its own; all of it goes into the prompt);
//! - stt-module, voice-assistant: msgpack `{audio: <WAV>}` (raw bytes, the most audio per body
//!   byte) with a 16-bit mono WAV filling the cap, the speech fixture tiled, at the lowest
//!   common rate that keeps the recording within `STT_MAX_AUDIO_MS` (600 s): the most samples
//!   per byte left after resampling to the VAD's 16 kHz;
//! - pipeline-bridge: a trigger of the bench catalog's `bench-max-body` entry, as many
//!   parameters of the longest allowed value (1024 characters) as fit, every one used in the
//!   Job it creates on fake-kube.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Error, Result, bail, ensure};
use serde::Serialize;

use crate::harness::catalog::{
    CHAT_HANDLER, PIPELINE_BRIDGE, STT_MODULE, TTS_MODULE, VOICE_ASSISTANT,
};
use crate::harness::fixtures::{
    self, PIPELINE_ENTRY, PIPELINE_MAX_BODY_BYTES, PIPELINE_MAX_VALUE_CHARS, pipeline_parameters,
};
use crate::harness::function::{Endpoints, Function};
use crate::harness::http::{Request, Response, exchange};
use crate::harness::measure::{IDLE_SETTLE, start_ready_with};
use crate::harness::proc::Proc;
use crate::harness::results::{Bound, TargetCheck, check_bound};
use crate::harness::section::{Context, RunSettings, Section};
use crate::harness::stats::mib;

/// The section's name in `BENCH_ONLY`: the max-body figure of every function, alone.
pub const SECTION: &str = "max-body";
/// Longest the max-size request may take per socket operation (a 32 MiB upload, minutes of
/// audio decoded, segmented and transcribed on two shared cores).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The target for stt-module and voice-assistant: peak over idle at most this many times the
/// body (their audio path holds about 7x at the cap today).
pub const SPEECH_MAX_X_BODY: f64 = 2.5;
/// `TTS_MAX_TEXT_CHARS`' default.
pub const TTS_MAX_TEXT_CHARS: usize = 5000;
/// `CHAT_MAX_MESSAGE_CHARS`' default.
pub const CHAT_MAX_MESSAGE_CHARS: usize = 8000;
/// `STT_MAX_AUDIO_MS`' default.
pub const STT_MAX_AUDIO_MS: u64 = 600_000;
/// The rates tried for the speech bodies, lowest first.
const RATES: [u32; 6] = [16_000, 22_050, 24_000, 32_000, 44_100, 48_000];

/// How one function's max-size body is made.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The function's default `MAX_BODY_BYTES` (checked: one byte over must be 413).
    pub cap: usize,
    /// The CloudEvent type.
    pub ce_type: &'static str,
    /// What fills the body, for the report.
    pub content: &'static str,
    build: fn(usize) -> Result<Body>,
    check: fn(&Response) -> Result<()>,
}

/// A built body.
#[derive(Debug, Clone)]
pub struct Body {
    /// `content-type`.
    pub content_type: &'static str,
    /// The bytes, at most the cap.
    pub bytes: Vec<u8>,
    /// What is in it, e.g. `WAV 32 kHz mono, 524.3 s`.
    pub detail: String,
}

/// The case for `function`, if it has one.
pub fn case(function: &str) -> Option<Case> {
    Some(match function {
        TTS_MODULE => Case {
            cap: 256 * 1024,
            ce_type: "ai.tts.request",
            content: "JSON: text of TTS_MAX_TEXT_CHARS, the rest whitespace",
            build: tts_body,
            check: tts_check,
        },
        CHAT_HANDLER => Case {
            cap: 256 * 1024,
            ce_type: "ai.chat.request",
            content: "JSON: message of CHAT_MAX_MESSAGE_CHARS plus history filling the cap",
            build: chat_body,
            check: chat_check,
        },
        STT_MODULE => Case {
            cap: 32 * 1024 * 1024,
            ce_type: "ai.stt.request",
            content: "msgpack: a 16-bit mono WAV filling the cap (speech fixture tiled)",
            build: speech_body,
            check: stt_check,
        },
        VOICE_ASSISTANT => Case {
            cap: 32 * 1024 * 1024,
            ce_type: "ai.voice.request",
            content: "msgpack: a 16-bit mono WAV filling the cap (speech fixture tiled)",
            build: speech_body,
            check: voice_check,
        },
        PIPELINE_BRIDGE => Case {
            cap: PIPELINE_MAX_BODY_BYTES,
            ce_type: "ai.pipeline.trigger",
            content: "JSON: parameters of the longest allowed value filling the cap",
            build: pipeline_body,
            check: pipeline_check,
        },
        _ => return None,
    })
}

/// One function's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MaxBodyResult {
    /// The function.
    pub name: String,
    /// The `MAX_BODY_BYTES` measured at: its default, or `BENCH_MAX_BODY_CAPS`'.
    pub max_body_bytes: usize,
    /// The body sent, bytes (the cap, or a byte under it where the format allows no exact fit).
    pub body_bytes: usize,
    /// What the body holds.
    pub content: String,
    /// `VmRSS` before the request, MiB.
    pub idle_rss_mib: f64,
    /// `VmHWM` after the request (reset to idle just before), MiB.
    pub peak_rss_mib: f64,
    /// Peak over idle, MiB.
    pub peak_over_idle_mib: f64,
    /// Peak over idle / body size.
    pub x_body: f64,
    /// Whether the peak could be reset before the request (else `VmHWM` includes start-up).
    pub hwm_reset: bool,
    /// How long the request took, ms.
    pub request_ms: f64,
    /// The status of a body one byte over the cap (413 expected).
    pub over_cap_status: u16,
}

/// What a function's Knative manifests allow it.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// `containerConcurrency` in service.yaml.
    pub container_concurrency: u64,
    /// The container's memory limit in service.yaml, MiB.
    pub memory_limit_mib: f64,
    /// `MAX_BODY_BYTES` in config.yaml, else the function's default.
    pub max_body_bytes: usize,
}

/// A function's memory limit against its measured worst request.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// The function.
    pub name: String,
    /// What its manifests set.
    pub manifest: Manifest,
    /// Idle RSS, MiB (measured).
    pub idle_mib: f64,
    /// The worst request at the manifests' body cap, MiB: the measured peak over idle x
    /// (manifest cap / measured cap).
    pub worst_request_mib: f64,
    /// idle + containerConcurrency x worst request, MiB.
    pub needed_mib: f64,
}

/// Where the manifests are.
pub fn knative_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../knative")
}

/// Reads `function`'s service.yaml and config.yaml under `dir` (plain line scans: our own files,
/// one container each).
pub fn manifest(dir: &Path, function: &str, default_cap: usize) -> Result<Manifest> {
    let read = |name: &str| {
        let path = dir.join(function).join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let service = read("service.yaml")?;
    let config = read("config.yaml")?;
    let value = |text: &str, key: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let rest = l.trim_start().strip_prefix(key)?.strip_prefix(':')?;
            Some(rest.trim().trim_matches('"').to_string())
        })
    };
    let container_concurrency = value(&service, "containerConcurrency")
        .context("no containerConcurrency in service.yaml")?
        .parse()
        .context("containerConcurrency is not a number")?;
    let limits = service
        .split_once("limits:")
        .context("no resources.limits in service.yaml")?
        .1;
    let memory = value(limits, "memory").context("no memory limit in service.yaml")?;
    let memory_limit_mib = if let Some(mi) = memory.strip_suffix("Mi") {
        mi.parse::<f64>()?
    } else if let Some(gi) = memory.strip_suffix("Gi") {
        gi.parse::<f64>()? * 1024.0
    } else {
        bail!("memory limit {memory:?} is not in Mi or Gi")
    };
    let max_body_bytes = match value(&config, "MAX_BODY_BYTES") {
        Some(v) => v
            .parse()
            .context("MAX_BODY_BYTES in config.yaml is not a number")?,
        None => default_cap,
    };
    Ok(Manifest {
        container_concurrency,
        memory_limit_mib,
        max_body_bytes,
    })
}

/// Every measured function against its manifests.
pub fn fits(section: &MaxBodyFigures, dir: &Path) -> (Vec<Fit>, Vec<String>) {
    let mut fits = Vec::new();
    let mut errors = Vec::new();
    for r in &section.results {
        match manifest(dir, &r.name, r.max_body_bytes) {
            Ok(m) => {
                let worst =
                    r.peak_over_idle_mib * m.max_body_bytes as f64 / r.max_body_bytes as f64;
                fits.push(Fit {
                    name: r.name.clone(),
                    idle_mib: r.idle_rss_mib,
                    worst_request_mib: worst,
                    needed_mib: r.idle_rss_mib + m.container_concurrency as f64 * worst,
                    manifest: m,
                });
            }
            Err(e) => errors.push(format!("{}: {e:#}", r.name)),
        }
    }
    (fits, errors)
}

/// The section's results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MaxBodyFigures {
    /// One entry per function measured.
    pub results: Vec<MaxBodyResult>,
    /// Each against its manifests' memory limit.
    pub fits: Vec<Fit>,
    /// Failed measurements, as `function: error`.
    pub errors: Vec<String>,
}

/// `BENCH_MAX_BODY_CAPS`: `name=bytes` pairs, comma-separated.
pub fn caps_from_env() -> Result<Vec<(String, usize)>> {
    let Ok(raw) = std::env::var("BENCH_MAX_BODY_CAPS") else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (name, bytes) = pair
                .split_once('=')
                .with_context(|| format!("BENCH_MAX_BODY_CAPS: {pair:?} is not name=bytes"))?;
            let bytes: usize = bytes
                .trim()
                .parse()
                .with_context(|| format!("BENCH_MAX_BODY_CAPS: {bytes:?} is not a size"))?;
            ensure!(bytes > 0, "BENCH_MAX_BODY_CAPS: {name} must be above 0");
            Ok((name.trim().to_string(), bytes))
        })
        .collect()
}

/// Measures every function in `functions` that has a [`case`], at its default cap or the one
/// `caps` names for it (then set as `MAX_BODY_BYTES` in its environment).
fn run(
    functions: &[&Function],
    caps: &[(String, usize)],
    endpoints: &Endpoints,
    logs: &Path,
) -> MaxBodyFigures {
    let mut section = MaxBodyFigures::default();
    for f in functions {
        let Some(mut case) = case(f.name) else {
            continue;
        };
        let set = caps.iter().find(|(n, _)| n == f.name).map(|&(_, c)| c);
        if let Some(cap) = set {
            case.cap = cap;
        }
        eprintln!(
            "bench: {}: peak RSS for one body at MAX_BODY_BYTES ({} bytes)",
            f.name, case.cap
        );
        match measure(f, &case, set.is_some(), endpoints, logs) {
            Ok(r) => section.results.push(r),
            Err(e) => section.errors.push(format!("{}: {e:#}", f.name)),
        }
    }
    let (fits, errors) = fits(&section, &knative_dir());
    section.fits = fits;
    section.errors.extend(errors);
    section
}

fn measure(
    f: &Function,
    case: &Case,
    set_cap: bool,
    endpoints: &Endpoints,
    logs: &Path,
) -> Result<MaxBodyResult> {
    let body = (case.build)(case.cap)?;
    ensure!(
        body.bytes.len() <= case.cap && body.bytes.len() + 1 >= case.cap,
        "the {} body is {} bytes, not the cap {}",
        f.name,
        body.bytes.len(),
        case.cap
    );
    let mut env = f.environment(0, endpoints, None);
    if set_cap {
        crate::harness::function::set_var(&mut env, "MAX_BODY_BYTES", case.cap.to_string());
    }
    let mut running = start_ready_with(f, env, logs)?;
    let addr = running.addr;
    let warm = exchange(
        addr,
        &f.event.request(addr, "bench-max-warm", false),
        REQUEST_TIMEOUT,
    )?;
    ensure!(
        warm.status == 200,
        "the sample event answered HTTP {}",
        warm.status
    );
    std::thread::sleep(IDLE_SETTLE);
    let idle_kib = running.proc.rss_kib()?;
    let hwm_reset = reset_peak(&running.proc).is_ok();

    let request = event(addr, case.ce_type, "bench-max-body", &body);
    let started = Instant::now();
    let reply = exchange(addr, &request, REQUEST_TIMEOUT)
        .with_context(|| format!("sending the max-size body ({})", body.detail))?;
    let request_ms = started.elapsed().as_secs_f64() * 1000.0;
    running.proc.check_alive()?;
    let peak_kib = running.proc.hwm_kib()?;
    ensure!(
        reply.status == 200,
        "the max-size body ({}) answered HTTP {}: {}",
        body.detail,
        reply.status,
        String::from_utf8_lossy(&reply.body[..reply.body.len().min(500)])
    );
    (case.check)(&reply).with_context(|| format!("the reply to {}", body.detail))?;

    // One byte over: announced, not sent, so the refusal comes before any of it is read.
    let over = Request::announce(
        "POST",
        addr,
        "/",
        &headers(case.ce_type, "bench-max-over", &body),
        case.cap + 1,
    );
    let over_reply = exchange(addr, &over, REQUEST_TIMEOUT)
        .context("announcing a body one byte over the cap")?;
    ensure!(
        over_reply.status == 413,
        "a body of {} bytes (one over the cap the bench assumes) answered HTTP {}, not 413: \
         the function's MAX_BODY_BYTES is not {} (update sections::max_body::case)",
        case.cap + 1,
        over_reply.status,
        case.cap
    );

    let peak_over = peak_kib.saturating_sub(idle_kib) * 1024;
    Ok(MaxBodyResult {
        name: f.name.to_string(),
        max_body_bytes: case.cap,
        body_bytes: body.bytes.len(),
        content: format!("{} ({})", case.content, body.detail),
        idle_rss_mib: mib(idle_kib * 1024),
        peak_rss_mib: mib(peak_kib * 1024),
        peak_over_idle_mib: mib(peak_over),
        x_body: peak_over as f64 / body.bytes.len() as f64,
        hwm_reset,
        request_ms,
        over_cap_status: over_reply.status,
    })
}

/// Resets the process' `VmHWM` to its current RSS (Linux >= 4.0).
fn reset_peak(proc: &Proc) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{}/clear_refs", proc.pid()), "5")
}

fn headers<'a>(ce_type: &'a str, id: &'a str, body: &Body) -> [(&'a str, &'a str); 5] {
    [
        ("ce-specversion", "1.0"),
        ("ce-type", ce_type),
        ("ce-source", "bench"),
        ("ce-id", id),
        ("content-type", body.content_type),
    ]
}

fn event(addr: SocketAddr, ce_type: &str, id: &str, body: &Body) -> Request {
    Request::new(
        "POST",
        addr,
        "/",
        &headers(ce_type, id, body),
        &body.bytes,
        false,
    )
}

/// `json` followed by spaces up to `cap` bytes (JSON allows whitespace after the value).
fn pad_json(json: String, cap: usize) -> Result<Vec<u8>> {
    ensure!(
        json.len() <= cap,
        "the JSON is {} bytes, over the cap {cap}",
        json.len()
    );
    let mut bytes = json.into_bytes();
    bytes.resize(cap, b' ');
    Ok(bytes)
}

/// `chars` characters of plain sentences.
fn sentences(chars: usize) -> String {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog. ";
    SENTENCE.chars().cycle().take(chars).collect()
}

fn tts_body(cap: usize) -> Result<Body> {
    let json = serde_json::json!({ "text": sentences(TTS_MAX_TEXT_CHARS) }).to_string();
    Ok(Body {
        content_type: "application/json",
        bytes: pad_json(json, cap)?,
        detail: format!("{TTS_MAX_TEXT_CHARS} characters of text"),
    })
}

fn chat_body(cap: usize) -> Result<Body> {
    const TURN_CHARS: usize = 4000;
    let message = sentences(CHAT_MAX_MESSAGE_CHARS);
    let mut history = Vec::new();
    let size = |history: &Vec<serde_json::Value>| {
        serde_json::json!({ "message": message, "history": history })
            .to_string()
            .len()
    };
    // Whole turns while they fit, then one turn cut to the room left.
    loop {
        let role = if history.len() % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        let turn = serde_json::json!({ "role": role, "content": sentences(TURN_CHARS) });
        history.push(turn);
        let over = size(&history).saturating_sub(cap);
        if over > 0 {
            let cut = TURN_CHARS.checked_sub(over).context("no room for a turn")?;
            history.pop();
            history.push(serde_json::json!({ "role": role, "content": sentences(cut) }));
            break;
        }
    }
    let turns = history.len();
    let json = serde_json::json!({ "message": message, "history": history }).to_string();
    Ok(Body {
        content_type: "application/json",
        bytes: pad_json(json, cap)?,
        detail: format!("{CHAT_MAX_MESSAGE_CHARS}-character message, {turns} history turns"),
    })
}

/// The speech request: msgpack `{"audio": bin}`.
#[derive(Serialize)]
struct Audio<'a> {
    #[serde(with = "handler_kit::event::bytes_field")]
    audio: &'a [u8],
}

fn audio_msgpack(samples: &[i16], rate: u32) -> Result<Vec<u8>> {
    let wav = audio::encode_pcm16(samples, rate).map_err(Error::msg)?;
    rmp_serde::to_vec_named(&Audio { audio: &wav }).context("encoding msgpack")
}

fn speech_body(cap: usize) -> Result<Body> {
    use audio::{Wav, resample};
    let name = fixtures::SPEECH[0];
    let bytes = fixtures::read_speech(name)?;
    let wav = Wav::parse(&bytes).map_err(Error::msg)?;
    let speech = wav.to_mono_i16();
    ensure!(!speech.is_empty(), "{name} has no samples");
    let max_samples = |rate: u32| (STT_MAX_AUDIO_MS * u64::from(rate) / 1000) as usize;
    // Bytes besides the samples: the WAV header and msgpack's framing (bin32 for any size here).
    let overhead = audio_msgpack(&[0; 70_000], 16_000)?.len() - 140_000;
    let samples = (cap - overhead) / 2;
    let rate = RATES
        .into_iter()
        .find(|&r| samples <= max_samples(r))
        .with_context(|| format!("a {cap}-byte WAV is longer than STT_MAX_AUDIO_MS at any rate"))?;
    let tile = resample(&speech, wav.sample_rate(), rate);
    let audio: Vec<i16> = tile.iter().copied().cycle().take(samples).collect();
    let body = audio_msgpack(&audio, rate)?;
    Ok(Body {
        content_type: "application/msgpack",
        detail: format!(
            "WAV {:.1} kHz mono, {:.1} s: {name} tiled",
            f64::from(rate) / 1000.0,
            samples as f64 / f64::from(rate)
        ),
        bytes: body,
    })
}

fn pipeline_body(cap: usize) -> Result<Body> {
    let count = pipeline_parameters(cap);
    let value: String = "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(PIPELINE_MAX_VALUE_CHARS)
        .collect();
    let parameters: serde_json::Map<String, serde_json::Value> = (0..count)
        .map(|i| (format!("p{i:03}"), value.clone().into()))
        .collect();
    let json = serde_json::json!({
        "request_id": "bench-max-body",
        "pipeline": PIPELINE_ENTRY,
        "parameters": parameters,
    })
    .to_string();
    Ok(Body {
        content_type: "application/json",
        bytes: pad_json(json, cap)?,
        detail: format!("{count} parameters of {PIPELINE_MAX_VALUE_CHARS} characters"),
    })
}

fn json_reply(r: &Response) -> Result<serde_json::Value> {
    serde_json::from_slice(&r.body).context("the reply is not JSON")
}

fn positive(v: &serde_json::Value, field: &str) -> Result<()> {
    match v.get(field).and_then(serde_json::Value::as_u64) {
        Some(n) if n > 0 => Ok(()),
        other => bail!("{field} is {other:?}, not above 0"),
    }
}

fn tts_check(r: &Response) -> Result<()> {
    let v = json_reply(r)?;
    positive(&v, "duration_ms")?;
    ensure!(
        v.get("audio").and_then(serde_json::Value::as_str).is_some(),
        "no audio in the reply"
    );
    Ok(())
}

fn chat_check(r: &Response) -> Result<()> {
    let v = json_reply(r)?;
    match v.get("response").and_then(serde_json::Value::as_str) {
        Some(answer) if !answer.is_empty() => Ok(()),
        _ => bail!("no answer in the reply"),
    }
}

fn stt_check(r: &Response) -> Result<()> {
    // msgpack in, msgpack out; the transcript holds no bytes, so it reads as JSON values.
    let v: serde_json::Value =
        rmp_serde::from_slice(&r.body).context("the reply is not msgpack")?;
    positive(&v, "speech_ms")?;
    match v.get("segments").and_then(serde_json::Value::as_array) {
        Some(s) if !s.is_empty() => Ok(()),
        _ => bail!("no transcript segments"),
    }
}

fn voice_check(r: &Response) -> Result<()> {
    ensure!(
        r.header("ce-type") == Some("ai.voice.response"),
        "the reply is {:?}, not ai.voice.response",
        r.header("ce-type")
    );
    ensure!(!r.body.is_empty(), "an empty reply");
    Ok(())
}

fn pipeline_check(r: &Response) -> Result<()> {
    ensure!(!json_reply(r)?.is_null(), "an empty reply");
    Ok(())
}

/// stt-module's and voice-assistant's target, peak over idle <= [`SPEECH_MAX_X_BODY`] x body,
/// and every function's fit in its memory limit.
fn check_targets(section: &MaxBodyFigures) -> Vec<TargetCheck> {
    let fits = section.fits.iter().map(|f| {
        check_bound(
            &f.name,
            format!(
                "idle + containerConcurrency ({}) x worst request ({:.1} MiB at MAX_BODY_BYTES \
                 {}) <= memory limit (knative/{}/service.yaml)",
                f.manifest.container_concurrency,
                f.worst_request_mib,
                f.manifest.max_body_bytes,
                f.name
            ),
            Some(f.needed_mib),
            Some(f.manifest.memory_limit_mib),
            "MiB",
            Bound::Max,
        )
    });
    let speech = [STT_MODULE, VOICE_ASSISTANT]
        .into_iter()
        .filter_map(|name| section.results.iter().find(|r| r.name == name))
        .map(|r| {
            check_bound(
                &r.name,
                format!("peak over idle, one max-size body <= {SPEECH_MAX_X_BODY}x the body"),
                Some(r.x_body),
                Some(SPEECH_MAX_X_BODY),
                "x body",
                Bound::Max,
            )
        });
    speech.chain(fits).collect()
}

/// The printed section.
fn render(s: &MaxBodyFigures) -> String {
    let mut out = String::from(
        "max-size body: one request with a body at MAX_BODY_BYTES (the default, or as \
         BENCH_MAX_BODY_CAPS sets it; peak = VmHWM, \
         reset to idle just before; idle = VmRSS after one sample event):\n",
    );
    let _ = writeln!(
        out,
        "{:<17}{:>12}{:>12}{:>12}{:>14}{:>9}{:>11}",
        "function", "body MiB", "idle MiB", "peak MiB", "peak-idle MiB", "x body", "request ms"
    );
    for r in &s.results {
        let _ = writeln!(
            out,
            "{:<17}{:>12.2}{:>12.2}{:>12.2}{:>14.2}{:>9.2}{:>11.0}{}",
            r.name,
            mib(r.body_bytes as u64),
            r.idle_rss_mib,
            r.peak_rss_mib,
            r.peak_over_idle_mib,
            r.x_body,
            r.request_ms,
            if r.hwm_reset {
                ""
            } else {
                "  (VmHWM not reset: includes start-up)"
            }
        );
    }
    for r in &s.results {
        let _ = writeln!(out, "  {}: {}", r.name, r.content);
    }
    if !s.fits.is_empty() {
        let _ = writeln!(
            out,
            "against the manifests (knative/<function>/: limit >= idle + containerConcurrency x \
             worst request, the worst scaled to the manifests' MAX_BODY_BYTES):"
        );
        for f in &s.fits {
            let m = &f.manifest;
            let _ = writeln!(
                out,
                "  {:<16} {:.1} + {} x {:.1} = {:.0} MiB {} {:.0}Mi (MAX_BODY_BYTES {})",
                f.name,
                f.idle_mib,
                m.container_concurrency,
                f.worst_request_mib,
                f.needed_mib,
                if f.needed_mib <= m.memory_limit_mib {
                    "<="
                } else {
                    "> "
                },
                m.memory_limit_mib,
                m.max_body_bytes
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The section.

/// The max-body section.
#[derive(Debug)]
pub struct MaxBodySection {
    caps: Vec<(String, usize)>,
    subjects: Vec<Function>,
    result: MaxBodyFigures,
}

impl MaxBodySection {
    /// Every function `BENCH_ONLY` names (all of them when it names [`SECTION`]), at the caps
    /// `caps` sets.
    pub fn new(caps: Vec<(String, usize)>, run: &RunSettings, catalog: &[Function]) -> Self {
        let subjects = catalog
            .iter()
            .filter(|f| run.wants(f.name) || run.wants(SECTION))
            .cloned()
            .collect();
        Self {
            caps,
            subjects,
            result: MaxBodyFigures::default(),
        }
    }
}

impl Section for MaxBodySection {
    fn key(&self) -> &'static str {
        "max_body"
    }

    fn selected(&self) -> bool {
        !self.subjects.is_empty()
    }

    fn functions(&self) -> Vec<&Function> {
        self.subjects.iter().collect()
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        let list: Vec<&Function> = self.subjects.iter().collect();
        self.result = run(&list, &self.caps, &ctx.endpoints(), &ctx.logs);
    }

    fn render(&self) -> Option<String> {
        let r = &self.result;
        (!(r.results.is_empty() && r.errors.is_empty())).then(|| render(r))
    }

    fn checks(&self) -> Vec<TargetCheck> {
        check_targets(&self.result)
    }

    fn errors(&self) -> Vec<String> {
        self.result
            .errors
            .iter()
            .map(|e| format!("max-body {e}"))
            .collect()
    }

    fn result_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&self.result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_fills_its_cap_and_parses() {
        for name in [TTS_MODULE, CHAT_HANDLER, PIPELINE_BRIDGE] {
            let case = case(name).unwrap();
            let body = (case.build)(case.cap).unwrap();
            assert_eq!(body.bytes.len(), case.cap, "{name}");
            let v: serde_json::Value = serde_json::from_slice(&body.bytes).unwrap();
            assert!(v.is_object(), "{name}");
        }
        let chat: serde_json::Value =
            serde_json::from_slice(&(chat_body(256 * 1024).unwrap().bytes)).unwrap();
        assert_eq!(
            chat["message"].as_str().unwrap().chars().count(),
            CHAT_MAX_MESSAGE_CHARS
        );
        assert!(chat["history"].as_array().unwrap().len() > 50);
    }

    #[test]
    fn speech_bodies_are_valid_wavs_within_the_audio_limit() {
        for cap in [16 * 1024 * 1024, 32 * 1024 * 1024] {
            let body = speech_body(cap).unwrap();
            assert!(
                body.bytes.len() <= cap && body.bytes.len() + 1 >= cap,
                "{cap}"
            );
            #[derive(serde::Deserialize)]
            struct Back {
                #[serde(with = "handler_kit::event::bytes_field")]
                audio: Vec<u8>,
            }
            let back: Back = rmp_serde::from_slice(&body.bytes).unwrap();
            let wav = audio::Wav::parse(&back.audio).unwrap();
            assert!(wav.duration_ms() <= STT_MAX_AUDIO_MS, "{cap}");
            assert!(wav.duration_ms() > STT_MAX_AUDIO_MS * 3 / 4, "{cap}");
        }
        // 16 MiB of 16 kHz mono is 524 s: no resampling needed; 32 MiB needs 32 kHz.
        assert!(
            speech_body(16 * 1024 * 1024)
                .unwrap()
                .detail
                .starts_with("WAV 16.0 kHz")
        );
        assert!(
            speech_body(32 * 1024 * 1024)
                .unwrap()
                .detail
                .starts_with("WAV 32.0 kHz")
        );
    }

    #[test]
    fn every_function_has_a_manifest_the_fit_check_reads() {
        for name in [
            TTS_MODULE,
            CHAT_HANDLER,
            STT_MODULE,
            VOICE_ASSISTANT,
            PIPELINE_BRIDGE,
        ] {
            let cap = case(name).unwrap().cap;
            let m = manifest(&knative_dir(), name, cap).unwrap();
            assert!(
                m.container_concurrency > 0 && m.memory_limit_mib >= 32.0,
                "{name}"
            );
            assert!(m.max_body_bytes > 0 && m.max_body_bytes <= cap, "{name}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("f")).unwrap();
        std::fs::write(
            dir.path().join("f/service.yaml"),
            concat!(
                "      containerConcurrency: 8\n",
                "          resources:\n",
                "            requests:\n",
                "              memory: 32Mi\n",
                "            limits:\n",
                "              memory: 1Gi\n",
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("f/config.yaml"),
            "data:\n  MAX_BODY_BYTES: \"1024\"\n",
        )
        .unwrap();
        let m = manifest(dir.path(), "f", 4096).unwrap();
        assert_eq!(m.container_concurrency, 8);
        assert!((m.memory_limit_mib - 1024.0).abs() < f64::EPSILON);
        assert_eq!(m.max_body_bytes, 1024);
        let section = MaxBodyFigures {
            results: vec![MaxBodyResult {
                name: "f".into(),
                max_body_bytes: 4096,
                idle_rss_mib: 10.0,
                peak_over_idle_mib: 40.0,
                ..MaxBodyResult::default()
            }],
            ..MaxBodyFigures::default()
        };
        let (fits, errors) = fits(&section, dir.path());
        assert!(errors.is_empty(), "{errors:?}");
        // 40 MiB at 4 KiB scales to 10 MiB at the manifests' 1 KiB: 10 + 8 x 10 = 90.
        assert!((fits[0].worst_request_mib - 10.0).abs() < 1e-9);
        assert!((fits[0].needed_mib - 90.0).abs() < 1e-9);
    }

    #[test]
    fn the_pipeline_entry_declares_every_parameter_the_body_sends() {
        let count = pipeline_parameters(64 * 1024);
        let entry = fixtures::pipeline_entry(count);
        let body: serde_json::Value =
            serde_json::from_slice(&pipeline_body(64 * 1024).unwrap().bytes).unwrap();
        let sent = body["parameters"].as_object().unwrap();
        assert_eq!(sent.len(), count);
        for name in sent.keys() {
            assert!(entry.contains(&format!("{name}: {{pattern")), "{name}");
            assert!(
                entry.contains(&format!("{{{{parameters.{name}}}}}")),
                "{name}"
            );
        }
    }
}
