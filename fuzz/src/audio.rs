//! `audio`: WAV decoding, conversion to 16 kHz mono, resampling and VAD segmentation: what
//! stt-module and voice-assistant do with an uploaded recording, and tts-module with a
//! backend's WAV.
//!
//! Invariants: a parsed WAV encodes and parses back to itself (what cannot be written back is
//! refused by the parser); split pieces each parse and
//! together hold every frame; [`SttClient::prepare`]'s output has the length resampling
//! promises; every VAD span is ordered, inside the audio, and selects at least one sample
//! (stt-module answers 500 for a span outside the audio).

use std::sync::OnceLock;

use audio::{Wav, encode_pcm16};
use stt_module::stt::{SttClient, SttConfig};
use stt_module::vad::{VAD_RATE, segments};

use crate::common::runtime;

/// Recordings up to 30 s: long enough for several utterances, short enough to keep a run fast
/// (the limit scales the work; it does not change what is checked).
const MAX_AUDIO_MS: &str = "30000";

fn client() -> &'static SttClient {
    static CLIENT: OnceLock<SttClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let env = [
            ("STT_URL", "http://127.0.0.1:9"),
            ("STT_MAX_AUDIO_MS", MAX_AUDIO_MS),
        ];
        let config = handler_kit::config::load(&env, SttConfig::read)
            .unwrap_or_else(|e| panic!("stt config: {e}"));
        // reqwest wants a runtime to exist when the client is built; it is never called here.
        let _guard = runtime().enter();
        let http = handler_kit::http::client(std::time::Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("http client: {e}"));
        SttClient::new(http, config)
    })
}

/// One input: the bytes of a WAV file (or what claims to be one).
pub fn run(data: &[u8]) {
    if let Ok(wav) = Wav::parse(data) {
        check_wav(&wav);
    }
    let client = client();
    let Ok(samples) = client.prepare(data) else {
        return;
    };
    let parsed =
        Wav::parse(data).unwrap_or_else(|e| panic!("prepare took what parse refuses: {e}"));
    let (frames, rate) = (parsed.frames() as u64, u64::from(parsed.sample_rate()));
    let expected = if rate == u64::from(VAD_RATE) {
        frames
    } else {
        (frames * u64::from(VAD_RATE) + rate / 2) / rate
    };
    assert_eq!(samples.len() as u64, expected, "resampled length");
    let audio_ms = samples.len() as u64 * 1000 / u64::from(VAD_RATE);
    let spans = segments(&client.config().vad, &samples);
    let mut floor = 0;
    for span in &spans {
        assert!(span.start_ms < span.end_ms, "{span:?}");
        assert!(span.start_ms >= floor, "spans overlap: {spans:?}");
        assert!(span.end_ms <= audio_ms, "{span:?} past {audio_ms} ms");
        assert!(
            !span.slice(&samples).is_empty(),
            "{span:?} selects no sample of {audio_ms} ms"
        );
        floor = span.end_ms;
    }
    let wav = encode_pcm16(&samples, VAD_RATE).unwrap_or_else(|e| panic!("encode: {e}"));
    let back = Wav::parse(&wav).unwrap_or_else(|e| panic!("our own WAV: {e}"));
    assert_eq!(back.to_mono_i16(), samples);
}

fn check_wav(wav: &Wav) {
    let mono = wav.to_mono_i16();
    assert_eq!(mono.len(), wav.frames());
    let _ = wav.duration_ms();
    // Whatever parses can be written back: `Wav::parse` refuses what hound reads but cannot
    // write (a rate of 0, a byte rate over 32 bits, valid bits over the container or of an
    // unwritable size).
    let bytes = wav
        .to_bytes()
        .unwrap_or_else(|e| panic!("a WAV that parsed does not encode ({:?}): {e}", wav.spec()));
    let back = Wav::parse(&bytes).unwrap_or_else(|e| panic!("our own encoding: {e}"));
    // Compared as bytes: float audio may hold NaN, which is not equal to itself.
    assert_eq!(
        back.spec(),
        wav.spec(),
        "encode -> parse changed the format"
    );
    let again = back.to_bytes().unwrap_or_else(|e| panic!("re-encode: {e}"));
    assert!(
        again == bytes,
        "encode -> parse -> encode changed the audio"
    );
    let frame_bytes =
        usize::from(wav.channels().max(1)) * usize::from(wav.spec().bits_per_sample.div_ceil(8));
    for max in [0, 100, 1000] {
        let pieces = wav
            .split(max)
            .unwrap_or_else(|e| panic!("split({max}): {e}"));
        let mut frames = 0;
        for piece in &pieces {
            if max >= 2 * 44 + frame_bytes {
                assert!(
                    piece.len() <= max,
                    "a piece of {} bytes over {max}",
                    piece.len()
                );
            }
            frames += Wav::parse(piece)
                .unwrap_or_else(|e| panic!("a piece does not parse: {e}"))
                .frames();
        }
        assert_eq!(frames, wav.frames(), "split({max}) lost frames");
    }
    let twice = Wav::concat([wav.clone(), wav.clone()])
        .unwrap_or_else(|e| panic!("concat: {e}"))
        .unwrap_or_else(|| panic!("concat of two is something"));
    assert_eq!(twice.frames(), 2 * wav.frames());
}
