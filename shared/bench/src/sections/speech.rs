//! The speech section: what the generic table cannot show for stt-module and voice-assistant.
//!
//! Both are in the generic list too ([`catalog`](crate::harness::catalog)): binary size, cold
//! start, idle RSS and RSS with 100 events in flight. Here:
//!
//! 1. **VAD speed**, in this process on one thread, with stt-module's own code and default
//!    settings (`STT_VAD_*` unset): for each fixture, decoding to 16 kHz mono (parse, downmix,
//!    resample: what `SttClient::prepare` does) and voice activity detection
//!    (`vad::segments`), each repeated until it has used [`VAD_MIN_CPU`] of this thread's CPU
//!    time (`/proc/thread-self/schedstat`, so time spent waiting for the CPU is not counted).
//!    "x real time" = seconds of audio per CPU second.
//! 2. **Audio forwarded**: the stt-module binary against a transcription mock in this process
//!    that counts what it receives. Each fixture is sent once as `ai.stt.request`; the figures
//!    are the reply's `speech_ms / audio_ms` and the bytes that reached the mock (multipart
//!    bodies, form fields included) against the bytes of a 16 kHz mono WAV of the whole
//!    recording, which is what forwarding everything would send.
//! 3. **Voice time to first audio**: voice-assistant with `NATS_URL` (a nats-server of its own)
//!    and STT, LLM and TTS on one `inference-sim` answering after [`BACKEND_DELAY`]. The
//!    recording is the first utterance of `two-utterances-16k.wav` (one speech segment, so one
//!    STT call). Pairs, one at a time: first the bench makes the three backend calls itself, in
//!    turn, with the payloads voice-assistant sends (the VAD's speech segment as a WAV, the
//!    completion for that transcript streamed to `[DONE]` — the simulated answer is one
//!    sentence, so its end is when the first sentence is complete — and the TTS of that
//!    answer); then one `ai.voice.request` timed from writing it to reading the first audio
//!    message on `ai.voice.response.stream.{request_id}`. Overhead = first audio - the sum of
//!    the three direct calls. Then the same with a simulator answering at once.
//!
//! Every child is a [`Proc`](crate::harness::proc::Proc) killed on drop, every wait has a deadline.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use audio::{Wav, encode_pcm16, resample};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};
use stt_module::vad::{Span, VAD_RATE, VadConfig, segments};
use tokio::runtime::Runtime;

use crate::harness::backends::{Backend, start_backend};
use crate::harness::catalog::{STT_MODULE, VOICE_ASSISTANT};
use crate::harness::error::{Context as _, Error, Result, ensure};
use crate::harness::fixtures::{self, read_speech};
use crate::harness::function::{Endpoints, Function, set_var};
use crate::harness::http::{Peer, Request, Response};
use crate::harness::llm::{completion_body, stream_completion_text};
use crate::harness::measure::{Running, start_ready_with};
use crate::harness::nats::{RawSubscriber, start_nats};
use crate::harness::results::{MeasureError, fail};
use crate::harness::section::{Context, RunSettings, Section, env_count};
use crate::harness::stats::{Summary, ms};

/// The speech fixtures measured.
const FIXTURES: [&str; 2] = fixtures::SPEECH;
/// CPU time each VAD-speed stage is repeated for, at least.
pub const VAD_MIN_CPU: Duration = Duration::from_millis(1500);
/// The simulator's `SIM_LATENCY_MS` in the time-to-first-audio measurement.
pub const BACKEND_DELAY: Duration = Duration::from_millis(50);
/// Pairs sent per mode before time to first audio is measured.
pub const VOICE_WARMUP_PAIRS: usize = 3;
/// The recording of the voice measurement is cut here: the first utterance of
/// `two-utterances-16k.wav` ends at 3.24 s, the second starts at 4.74 s.
const VOICE_CUT_MS: u64 = 4000;
/// The stream subject template (`VOICE_STREAM_SUBJECT` default).
const STREAM_SUBJECT: &str = "ai.voice.response.stream.";
/// Longest one request, backend call or NATS read may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one series of pairs may take.
const SERIES_DEADLINE: Duration = Duration::from_secs(60);
/// The transcription path stt-module and voice-assistant call.
pub const TRANSCRIBE_PATH: &str = "/v1/audio/transcriptions";

/// Settings of the section, from `BENCH_VOICE_*` variables.
#[derive(Debug, Clone, Serialize)]
pub struct SpeechSettings {
    /// Pairs measured per mode for time to first audio (`BENCH_VOICE_EVENTS`, 50).
    pub voice_events: usize,
    /// Pairs sent per mode before (not measured).
    pub voice_warmup_events: usize,
    /// The simulator's response delay, ms.
    pub backend_delay_ms: u64,
    /// Minimum CPU time per VAD-speed stage, ms.
    pub vad_min_cpu_ms: u64,
}

impl SpeechSettings {
    /// Reads the variables.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            voice_events: env_count("BENCH_VOICE_EVENTS", 50)?,
            voice_warmup_events: VOICE_WARMUP_PAIRS,
            backend_delay_ms: u64::try_from(BACKEND_DELAY.as_millis()).unwrap_or(u64::MAX),
            vad_min_cpu_ms: u64::try_from(VAD_MIN_CPU.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// VAD speed on one fixture.
#[derive(Debug, Clone, Serialize)]
pub struct VadSpeed {
    /// The fixture's file name.
    pub fixture: String,
    /// Its length, ms.
    pub audio_ms: u64,
    /// Sample rate and channels, e.g. `44100 Hz stereo`.
    pub format: String,
    /// Utterances found (default settings).
    pub utterances: usize,
    /// Decode + downmix + resample to 16 kHz: CPU ms per run, and runs.
    pub decode_cpu_ms: f64,
    /// Runs of the decoding.
    pub decode_runs: usize,
    /// VAD over the 16 kHz samples: CPU ms per run.
    pub vad_cpu_ms: f64,
    /// Runs of the VAD.
    pub vad_runs: usize,
    /// Audio seconds per CPU second, VAD alone.
    pub vad_x_realtime: f64,
    /// Audio seconds per CPU second, decoding and VAD together.
    pub total_x_realtime: f64,
}

/// What stt-module forwarded for one fixture.
#[derive(Debug, Clone, Serialize)]
pub struct Forwarded {
    /// The fixture's file name.
    pub fixture: String,
    /// The fixture's size, bytes.
    pub input_bytes: usize,
    /// The reply's `audio_ms`.
    pub audio_ms: u64,
    /// The reply's `speech_ms` (padding included).
    pub speech_ms: u64,
    /// `speech_ms / audio_ms`.
    pub fraction_of_duration: f64,
    /// Transcription requests the mock received.
    pub requests: usize,
    /// Bytes the mock received (multipart bodies).
    pub forwarded_bytes: usize,
    /// A 16 kHz mono 16-bit WAV of the whole recording, bytes.
    pub whole_16k_bytes: usize,
    /// `forwarded_bytes / whole_16k_bytes`.
    pub fraction_of_bytes: f64,
}

/// Time to first audio through voice-assistant, against its backends' own latency.
#[derive(Debug, Clone, Serialize)]
pub struct Ttfa {
    /// The simulator's `SIM_LATENCY_MS`.
    pub backend_delay_ms: u64,
    /// Pairs measured.
    pub events: usize,
    /// Through voice-assistant: request written -> first audio message read, ms.
    pub first_audio_ms: Summary,
    /// The three backend calls made directly, summed, ms.
    pub direct_ms: Summary,
    /// Per pair: first audio - direct, ms.
    pub overhead_ms: Summary,
    /// Means of the direct STT, LLM (to `[DONE]`) and TTS calls, ms.
    pub direct_means_ms: [f64; 3],
    /// voice-assistant's own `timings_ms` means: stt, ttft, first_audio.
    pub reported_means_ms: [f64; 3],
}

/// Everything measured in the section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpeechResult {
    /// VAD speed per fixture.
    pub vad: Vec<VadSpeed>,
    /// Audio forwarded per fixture.
    pub forwarded: Vec<Forwarded>,
    /// Time to first audio, with the delayed and the instant simulator.
    pub ttfa: Vec<Ttfa>,
    /// Failed measurements.
    pub errors: Vec<MeasureError>,
}

/// Measurement names, as used in [`SpeechResult::errors`].
pub mod measures {
    /// VAD speed.
    pub const VAD: &str = "VAD speed";
    /// Audio forwarded.
    pub const FORWARDED: &str = "audio forwarded";
    /// Time to first audio.
    pub const TTFA: &str = "time to first audio";
}

impl SpeechResult {
    fn fail(&mut self, measure: &'static str, error: &Error) {
        fail(&mut self.errors, measure, error);
    }
}

/// What the section needs from the run.
#[derive(Debug)]
struct SpeechEnv<'a> {
    /// stt-module, as in the generic list.
    stt: &'a Function,
    /// voice-assistant, as in the generic list.
    voice: &'a Function,
    /// The instant simulator and the Milvus mock.
    endpoints: &'a Endpoints,
    /// Where `inference-sim` is.
    bin_dir: &'a Path,
    /// The nats-server binary.
    nats_server: &'a Path,
    /// Child output.
    logs: &'a Path,
    /// The runtime the transcription mock runs on.
    rt: &'a Runtime,
}

/// Runs the section. Failures are recorded in the result, never returned.
fn run(settings: &SpeechSettings, env: &SpeechEnv<'_>) -> SpeechResult {
    let mut r = SpeechResult::default();
    eprintln!("bench: speech: VAD speed (one thread, in process)");
    for name in FIXTURES {
        match vad_speed(name) {
            Ok(v) => r.vad.push(v),
            Err(e) => r.fail(measures::VAD, &e.context(name)),
        }
    }
    eprintln!("bench: speech: audio forwarded by stt-module");
    match forwarded(env) {
        Ok(f) => r.forwarded = f,
        Err(e) => r.fail(measures::FORWARDED, &e),
    }
    eprintln!(
        "bench: speech: voice-assistant time to first audio ({} pairs per mode after {} warm-up)",
        settings.voice_events, settings.voice_warmup_events
    );
    match start_nats(env.nats_server, env.logs, "nats-server-voice", env.rt) {
        Ok(nats) => {
            for delay in [BACKEND_DELAY, Duration::ZERO] {
                match ttfa(settings, env, &nats.url, delay) {
                    Ok(t) => r.ttfa.push(t),
                    Err(e) => r.fail(measures::TTFA, &e),
                }
            }
        }
        Err(e) => r.fail(measures::TTFA, &e),
    }
    r
}

// ---------------------------------------------------------------------------------------------
// VAD speed.

/// CPU time this thread has used (`/proc/thread-self/schedstat`, nanoseconds on the CPU).
fn thread_cpu() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("no CPU time in /proc/thread-self/schedstat")?;
    Ok(Duration::from_nanos(ns))
}

/// Runs `work` until it has used [`VAD_MIN_CPU`]; returns CPU time per run and the runs.
fn per_run<T>(mut work: impl FnMut() -> T) -> Result<(Duration, usize)> {
    std::hint::black_box(work()); // warm-up
    let start = thread_cpu()?;
    let mut runs = 0u32;
    loop {
        std::hint::black_box(work());
        runs += 1;
        let used = thread_cpu()?.saturating_sub(start);
        if used >= VAD_MIN_CPU {
            return Ok((used / runs, runs as usize));
        }
    }
}

/// Decodes a WAV to 16 kHz mono, as stt-module does before the VAD.
fn to_16k(wav: &Wav) -> Vec<i16> {
    resample(&wav.to_mono_i16(), wav.sample_rate(), VAD_RATE)
}

fn vad_speed(name: &str) -> Result<VadSpeed> {
    let bytes = read_speech(name)?;
    let config = VadConfig::default();
    let wav = Wav::parse(&bytes).map_err(Error::msg)?;
    let samples = to_16k(&wav);
    let spans = segments(&config, &samples);
    let (decode, decode_runs) = per_run(|| {
        Wav::parse(&bytes)
            .map(|w| to_16k(&w))
            .map_or(0, |s| s.len())
    })?;
    let (vad, vad_runs) = per_run(|| segments(&config, &samples).len())?;
    let audio = Duration::from_millis(wav.duration_ms());
    let x = |cpu: Duration| audio.as_secs_f64() / cpu.as_secs_f64().max(1e-9);
    Ok(VadSpeed {
        fixture: name.to_string(),
        audio_ms: wav.duration_ms(),
        format: format!(
            "{} Hz {}",
            wav.sample_rate(),
            if wav.channels() == 1 {
                "mono".to_string()
            } else {
                format!("{} ch", wav.channels())
            }
        ),
        utterances: spans.len(),
        decode_cpu_ms: ms(decode),
        decode_runs,
        vad_cpu_ms: ms(vad),
        vad_runs,
        vad_x_realtime: x(vad),
        total_x_realtime: x(decode + vad),
    })
}

// ---------------------------------------------------------------------------------------------
// Audio forwarded.

/// A transcription endpoint in the bench process (axum on the bench's tokio runtime) that
/// counts requests and bytes and answers `{"text": "ok"}` at once. Stopped when dropped.
struct TranscriptionCounter {
    url: String,
    requests: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for TranscriptionCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TranscriptionCounter {
    fn start(rt: &Runtime) -> Result<Self> {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .context("binding the transcription counter")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let counters = (requests.clone(), bytes.clone());
        let app = axum::Router::new()
            .route(
                TRANSCRIBE_PATH,
                axum::routing::post(
                    |axum::extract::State((requests, bytes)): axum::extract::State<(
                        Arc<AtomicUsize>,
                        Arc<AtomicUsize>,
                    )>,
                     body: axum::body::Bytes| async move {
                        requests.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(body.len(), Ordering::Relaxed);
                        axum::Json(json!({"text": "ok"}))
                    },
                ),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(counters);
        let task = rt.spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            url: format!("http://{addr}"),
            requests,
            bytes,
            task,
        })
    }

    fn take(&self) -> (usize, usize) {
        (
            self.requests.swap(0, Ordering::Relaxed),
            self.bytes.swap(0, Ordering::Relaxed),
        )
    }
}

/// A JSON CloudEvent of type `ty` with `ce-id: id`.
fn event(addr: SocketAddr, ty: &str, id: &str, data: &Value) -> Request {
    Request::new(
        "POST",
        addr,
        "/",
        &[
            ("ce-specversion", "1.0"),
            ("ce-type", ty),
            ("ce-source", "bench"),
            ("ce-id", id),
            ("content-type", "application/json"),
        ],
        data.to_string().as_bytes(),
        true,
    )
}

/// The JSON data of a reply answered 200.
fn reply_data(r: &Response, what: &str) -> Result<Value> {
    ensure!(
        r.status == 200,
        "{what} answered HTTP {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).with_context(|| format!("{what}'s reply is not JSON"))
}

fn forwarded(env: &SpeechEnv<'_>) -> Result<Vec<Forwarded>> {
    let counter = TranscriptionCounter::start(env.rt)?;
    let mut vars = env.stt.environment(0, env.endpoints, None);
    set_var(&mut vars, "STT_URL", counter.url.clone());
    let mut stt = start_ready_with(env.stt, vars, env.logs)?;
    let mut peer = Peer::new(stt.addr);
    let mut out = Vec::new();
    for name in FIXTURES {
        let bytes = read_speech(name)?;
        let audio = base64::engine::general_purpose::STANDARD.encode(&bytes);
        counter.take();
        let id = format!("forwarded-{name}");
        let request = event(
            stt.addr,
            "ai.stt.request",
            &id,
            &json!({"audio": audio, "request_id": id}),
        );
        let (r, _, _) = peer.send(&request, &mut |_| {})?;
        let data = reply_data(&r, "stt-module")?;
        let (requests, forwarded_bytes) = counter.take();
        let audio_ms = data["audio_ms"].as_u64().context("no audio_ms")?;
        let speech_ms = data["speech_ms"].as_u64().context("no speech_ms")?;
        let wav = Wav::parse(&bytes).map_err(Error::msg)?;
        let whole_16k_bytes = encode_pcm16(&to_16k(&wav), VAD_RATE)
            .map_err(Error::msg)?
            .len();
        ensure!(audio_ms > 0, "stt-module reports no audio for {name}");
        out.push(Forwarded {
            fixture: name.to_string(),
            input_bytes: bytes.len(),
            audio_ms,
            speech_ms,
            fraction_of_duration: speech_ms as f64 / audio_ms as f64,
            requests,
            forwarded_bytes,
            whole_16k_bytes,
            fraction_of_bytes: forwarded_bytes as f64 / whole_16k_bytes as f64,
        });
    }
    stt.proc.check_alive()?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Voice time to first audio.

/// The voice recording: the first utterance of `two-utterances-16k.wav` (WAV bytes), and the
/// WAV of its speech segment, which is what voice-assistant sends to STT.
fn voice_recording() -> Result<(Vec<u8>, Vec<u8>)> {
    let wav = Wav::parse(&read_speech(FIXTURES[0])?).map_err(Error::msg)?;
    ensure!(wav.sample_rate() == VAD_RATE && wav.channels() == 1);
    let mut samples = wav.to_mono_i16();
    samples.truncate((VOICE_CUT_MS * u64::from(VAD_RATE) / 1000) as usize);
    let spans: Vec<Span> = segments(&VadConfig::default(), &samples);
    ensure!(
        spans.len() == 1,
        "expected one utterance in the first {VOICE_CUT_MS} ms, found {}",
        spans.len()
    );
    let segment = encode_pcm16(spans[0].slice(&samples), VAD_RATE).map_err(Error::msg)?;
    let recording = encode_pcm16(&samples, VAD_RATE).map_err(Error::msg)?;
    Ok((recording, segment))
}

/// A multipart transcription request for `wav`, as the STT client sends it.
fn transcription_request(addr: SocketAddr, wav: &[u8]) -> Request {
    let boundary = "bench-boundary-7d1f";
    let mut body = Vec::with_capacity(wav.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"audio.wav\"\r\n\
             content-type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(wav);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    Request::new(
        "POST",
        addr,
        TRANSCRIBE_PATH,
        &[("content-type", &content_type), ("accept", "*/*")],
        &body,
        true,
    )
}

/// `text` percent-encoded for a query string.
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

struct VoicePair {
    direct: [Duration; 3],
    first_audio: Duration,
    reported: [f64; 3],
}

/// The processes of one time-to-first-audio measurement.
struct VoiceRig {
    _sim: Backend,
    voice: Running,
    sim: Peer,
    subscriber: RawSubscriber,
    recording_b64: String,
    segment: Vec<u8>,
}

impl VoiceRig {
    fn start(env: &SpeechEnv<'_>, nats_url: &str, delay: Duration) -> Result<Self> {
        let sim = start_backend(
            env.bin_dir,
            delay,
            Duration::ZERO,
            env.logs,
            &format!("voice-{}ms", delay.as_millis()),
        )?;
        let mut vars = env.voice.environment(0, env.endpoints, None);
        for name in ["STT_URL", "LLM_URL", "TTS_URL", "EMBED_URL", "RERANK_URL"] {
            set_var(&mut vars, name, sim.url.clone());
        }
        set_var(&mut vars, "NATS_URL", nats_url);
        let voice = start_ready_with(env.voice, vars, env.logs)?;
        let subscriber = RawSubscriber::connect(nats_url, &format!("{STREAM_SUBJECT}>"))?;
        let (recording, segment) = voice_recording()?;
        Ok(Self {
            sim: Peer::new(sim.addr()?),
            _sim: sim,
            voice,
            subscriber,
            recording_b64: base64::engine::general_purpose::STANDARD.encode(recording),
            segment,
        })
    }

    /// The three backend calls, in turn, timed each from writing to the whole answer read.
    fn direct(&mut self) -> Result<[Duration; 3]> {
        let request = transcription_request(self.sim.addr, &self.segment);
        let (r, _, stt) = self.sim.send(&request, &mut |_| {})?;
        let transcript = reply_data(&r, "the simulator's transcription")?["text"]
            .as_str()
            .context("no text in the transcription")?
            .to_string();
        let (answer, llm) =
            stream_completion_text(&mut self.sim, &completion_body(&transcript, &[]))?;
        let path = format!("/api/tts?text={}", query_escape(answer.trim()));
        let request = Request::new("GET", self.sim.addr, &path, &[("accept", "*/*")], &[], true);
        let (r, _, tts) = self.sim.send(&request, &mut |_| {})?;
        ensure!(
            r.status == 200 && r.body.starts_with(b"RIFF"),
            "the simulator's TTS answered HTTP {} without a WAV",
            r.status
        );
        Ok([stt, llm, tts])
    }

    fn pair(&mut self, id: &str, voice: &mut Peer) -> Result<VoicePair> {
        let direct = self.direct()?;
        let data = json!({"audio": self.recording_b64, "request_id": id, "enable_rag": false});
        let request = event(voice.addr, "ai.voice.request", id, &data);
        let subject = format!("{STREAM_SUBJECT}{id}");
        let conn = voice.conn()?;
        let sent = Instant::now();
        conn.write(&request)
            .context("sending an event to voice-assistant")?;
        // Audio is published before the reply is written: read it first, up to `done`.
        let first = self
            .subscriber
            .stream_until_done(&subject, sent + CALL_TIMEOUT, |m| {
                ensure!(
                    m.payload.len() > 1000,
                    "the first message on {subject} carries no audio"
                );
                Ok(())
            })?;
        let r = conn.read().context("reading voice-assistant's answer")?;
        let data = reply_data(&r, "voice-assistant")?;
        let t = &data["timings_ms"];
        let field = |name: &str| {
            t[name]
                .as_f64()
                .with_context(|| format!("no timings_ms.{name}"))
        };
        Ok(VoicePair {
            direct,
            first_audio: first.saturating_duration_since(sent),
            reported: [field("stt")?, field("ttft")?, field("first_audio")?],
        })
    }
}

fn ttfa(
    settings: &SpeechSettings,
    env: &SpeechEnv<'_>,
    nats_url: &str,
    delay: Duration,
) -> Result<Ttfa> {
    let mut rig = VoiceRig::start(env, nats_url, delay)?;
    let mut voice = Peer::new(rig.voice.addr);
    let started = Instant::now();
    let mut samples = Vec::with_capacity(settings.voice_events);
    for i in 0..settings.voice_warmup_events + settings.voice_events {
        ensure!(
            started.elapsed() < SERIES_DEADLINE,
            "not done within {SERIES_DEADLINE:?}"
        );
        let id = format!("ttfa-{}ms-{i}", delay.as_millis());
        let p = rig
            .pair(&id, &mut voice)
            .with_context(|| format!("voice-assistant request {id}"))?;
        if i >= settings.voice_warmup_events {
            samples.push(p);
        }
    }
    rig.voice.proc.check_alive()?;
    let n = samples.len() as f64;
    let sum = |p: &VoicePair| p.direct.iter().sum::<Duration>();
    let mean = |f: &dyn Fn(&VoicePair) -> f64| samples.iter().map(f).sum::<f64>() / n;
    let of = |v: Vec<f64>| Summary::of_ms(&v).context("no samples");
    Ok(Ttfa {
        backend_delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        events: samples.len(),
        first_audio_ms: of(samples.iter().map(|p| ms(p.first_audio)).collect())?,
        direct_ms: of(samples.iter().map(|p| ms(sum(p))).collect())?,
        overhead_ms: of(samples
            .iter()
            .map(|p| ms(p.first_audio) - ms(sum(p)))
            .collect())?,
        direct_means_ms: [
            mean(&|p| ms(p.direct[0])),
            mean(&|p| ms(p.direct[1])),
            mean(&|p| ms(p.direct[2])),
        ],
        reported_means_ms: [
            mean(&|p| p.reported[0]),
            mean(&|p| p.reported[1]),
            mean(&|p| p.reported[2]),
        ],
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

/// The section as printed under the table.
fn render(r: &SpeechResult) -> String {
    let mut out = String::from("speech (stt-module, voice-assistant):\n");
    let mut row = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<32}{value}");
    };
    for v in &r.vad {
        row(
            &format!("VAD x real time, {}", v.fixture),
            format!(
                "{:.0}x VAD alone, {:.0}x with decoding   ({} ms of {}; {} utterances; CPU per run: \
                 decode {:.3} ms, VAD {:.3} ms)",
                v.vad_x_realtime,
                v.total_x_realtime,
                v.audio_ms,
                v.format,
                v.utterances,
                v.decode_cpu_ms,
                v.vad_cpu_ms
            ),
        );
    }
    for f in &r.forwarded {
        row(
            &format!("forwarded, {}", f.fixture),
            format!(
                "{:.0}% of the duration ({} of {} ms), {:.0}% of the bytes ({} of {} for the \
                 whole recording at 16 kHz) in {} requests",
                f.fraction_of_duration * 100.0,
                f.speech_ms,
                f.audio_ms,
                f.fraction_of_bytes * 100.0,
                f.forwarded_bytes,
                f.whole_16k_bytes,
                f.requests
            ),
        );
    }
    for t in &r.ttfa {
        row(
            &format!("voice TTFA overhead, {} ms", t.backend_delay_ms),
            format!(
                "p50 {:.2} / p90 {:.2} / p99 {:.2} ms   (first audio p50 {:.2} ms - direct STT + \
                 LLM + TTS p50 {:.2} ms; {} pairs)",
                t.overhead_ms.p50,
                t.overhead_ms.p90,
                t.overhead_ms.p99,
                t.first_audio_ms.p50,
                t.direct_ms.p50,
                t.events
            ),
        );
        row(
            "",
            format!(
                "direct means: STT {:.2}, LLM {:.2}, TTS {:.2} ms; voice-assistant's own timings_ms \
                 means: stt {:.1}, ttft {:.1}, first_audio {:.1}",
                t.direct_means_ms[0],
                t.direct_means_ms[1],
                t.direct_means_ms[2],
                t.reported_means_ms[0],
                t.reported_means_ms[1],
                t.reported_means_ms[2]
            ),
        );
    }
    out
}

/// How the section was measured, for the notes.
fn notes(settings: &SpeechSettings) -> Vec<String> {
    vec![
        format!(
            "speech VAD speed: stt-module's code in the bench process on one thread, default \
             STT_VAD_* settings; each stage repeated until it used {} ms of the thread's CPU time \
             (/proc/thread-self/schedstat); x real time = audio seconds per CPU second. Decoding = \
             WAV parse + downmix + resample to 16 kHz.",
            settings.vad_min_cpu_ms
        ),
        "speech forwarded: stt-module (default settings) against a transcription endpoint in the \
         bench process that counts requests and body bytes; one ai.stt.request per fixture. \
         Duration fraction = the reply's speech_ms / audio_ms (padding included); byte fraction = \
         multipart bytes received / a 16 kHz mono WAV of the whole recording."
            .to_string(),
        format!(
            "voice TTFA: voice-assistant with NATS_URL (its own nats-server), enable_rag false, STT, \
             LLM and TTS (Coqui API) on one inference-sim with SIM_LATENCY_MS={} (then 0). The \
             recording is the first {VOICE_CUT_MS} ms of {} (one utterance). {} pairs per mode after \
             {} warm-up, one at a time: the bench's own STT call (the VAD segment voice-assistant \
             sends), completion streamed to [DONE] (the simulated answer is one sentence) and TTS of \
             the answer, then the voice request, written -> first audio message read by a raw NATS \
             subscriber on {STREAM_SUBJECT}>. Overhead = first audio - the three direct calls, per pair.",
            settings.backend_delay_ms,
            FIXTURES[0],
            settings.voice_events,
            settings.voice_warmup_events
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The section.

/// The speech section.
#[derive(Debug)]
pub struct SpeechSection {
    settings: SpeechSettings,
    /// stt-module and voice-assistant, when `BENCH_ONLY` lets both run.
    functions: Option<(Function, Function)>,
    result: SpeechResult,
}

impl SpeechSection {
    /// Measures stt-module and voice-assistant when `BENCH_ONLY` lets both run.
    pub fn new(settings: SpeechSettings, run: &RunSettings, catalog: &[Function]) -> Self {
        let find = |name: &str| {
            catalog
                .iter()
                .find(|f| f.name == name && run.wants(f.name))
                .cloned()
        };
        Self {
            settings,
            functions: find(STT_MODULE).zip(find(VOICE_ASSISTANT)),
            result: SpeechResult::default(),
        }
    }
}

impl Section for SpeechSection {
    fn key(&self) -> &'static str {
        "speech"
    }

    fn selected(&self) -> bool {
        self.functions.is_some()
    }

    fn functions(&self) -> Vec<&Function> {
        self.functions
            .iter()
            .flat_map(|(stt, voice)| [stt, voice])
            .collect()
    }

    fn run(&mut self, ctx: &mut Context<'_>) {
        let Some((stt, voice)) = &self.functions else {
            return;
        };
        let rt = match ctx.rt() {
            Ok(rt) => rt,
            Err(e) => {
                self.result.fail(measures::VAD, &e);
                return;
            }
        };
        let endpoints = ctx.endpoints();
        let env = SpeechEnv {
            stt,
            voice,
            endpoints: &endpoints,
            bin_dir: ctx.bin_dir(),
            nats_server: &ctx.nats_server,
            logs: &ctx.logs,
            rt,
        };
        self.result = run(&self.settings, &env);
    }

    fn render(&self) -> Option<String> {
        let r = &self.result;
        (!(r.vad.is_empty() && r.errors.is_empty())).then(|| render(r))
    }

    fn notes(&self) -> Vec<String> {
        notes(&self.settings)
    }

    fn errors(&self) -> Vec<String> {
        self.result
            .errors
            .iter()
            .map(|e| format!("speech {}: {}", e.measure, e.error))
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
    fn query_escape_keeps_unreserved_characters() {
        assert_eq!(query_escape("a b.c/ä"), "a%20b.c%2F%C3%A4");
    }

    #[test]
    fn the_voice_recording_has_one_utterance() {
        let (recording, segment) = voice_recording().unwrap();
        assert!(segment.len() < recording.len());
        let wav = Wav::parse(&recording).unwrap();
        assert_eq!(wav.duration_ms(), VOICE_CUT_MS);
    }
}
