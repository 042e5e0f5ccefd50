//! `vad`: the streaming VAD segmenter and the state it keeps between chunks (MessagePack in
//! stt-module's KV bucket).
//!
//! Input: one byte of flags (mode, frame length, whether a stored state follows, raw or
//! synthesized audio), four bytes of timings, a chunking seed, optionally a stored state
//! (`u16` length, then its bytes), then the audio: raw little-endian samples, or two-byte
//! records `[kind << 6 | tens of ms - 1, level]` of silence, noise, tone or bursts, so a short
//! input describes seconds of audio.
//!
//! From a fresh state, streaming the audio in random chunks through stored state must give
//! exactly the spans of one batch run (the module's promise), spans must be ordered and not
//! overlap, and `keep_from_ms` must never pass a span still to come. A stored state that is
//! garbage must be refused or continued without a panic.

use stt_module::vad::{Segmenter, Span, VadConfig, segments};

use crate::common::XorShift;

/// At most 30 s of audio per input (16 kHz).
const MAX_SAMPLES: usize = 30 * 16_000;

/// One input; see the module docs for its layout.
pub fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((timings, rest)) = rest.split_first_chunk::<5>() else {
        return;
    };
    let config = config(flags, timings);
    let seed = u64::from(timings[4]) + 1;
    let (stored, rest) = if flags & 0x10 != 0 {
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        let (state, rest) = rest.split_at(len);
        (Some(state), rest)
    } else {
        (None, rest)
    };
    let samples = if flags & 0x20 != 0 {
        rest.chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect()
    } else {
        synthesize(rest, seed)
    };
    match stored {
        None => streaming_equals_batch(&config, &samples, seed),
        Some(state) => {
            if let Ok(segmenter) = rmp_serde::from_slice::<Segmenter>(state) {
                continue_stored(&config, segmenter, &samples, seed);
            }
        }
    }
}

/// A configuration `VadConfig::read` accepts, from the flags and timing bytes.
pub fn config(flags: u8, t: &[u8; 5]) -> VadConfig {
    let frame = [10u32, 20, 30, 30][usize::from((flags >> 2) & 3)];
    let padding = u32::from(t[0]) * 10;
    let env = [
        ("STT_VAD_MODE", (flags & 3).to_string()),
        ("STT_VAD_FRAME_MS", frame.to_string()),
        ("STT_VAD_PADDING_MS", padding.to_string()),
        (
            "STT_VAD_SILENCE_MS",
            (frame + u32::from(t[1]) * 10).to_string(),
        ),
        ("STT_VAD_MIN_SPEECH_MS", (u32::from(t[2]) * 10).to_string()),
        (
            "STT_MAX_UTTERANCE_MS",
            (1000 + 2 * padding + u32::from(t[3]) * 100).to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    handler_kit::config::load(&env, VadConfig::read)
        .unwrap_or_else(|e| panic!("a config built to be valid is refused: {e}"))
}

/// Audio from two-byte records: kind (silence, noise, tone, bursts) and length, then a level.
pub fn synthesize(records: &[u8], seed: u64) -> Vec<i16> {
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut samples = Vec::new();
    for record in records.chunks_exact(2) {
        let (kind, level) = (record[0] >> 6, i32::from(record[1]));
        let len = (usize::from(record[0] & 0x3f) + 1) * 160;
        for i in 0..len {
            let mut noise = || rng.below(2001) as i32 - 1000;
            let value = match kind {
                0 => noise() * level / 8000,
                1 => noise() * level / 40,
                2 => {
                    let period = 16_000 / (100 + level as usize * 10);
                    if (i / (period / 2).max(1)).is_multiple_of(2) {
                        8000
                    } else {
                        -8000
                    }
                }
                _ => {
                    // Noise under a 4 Hz envelope: loud and quiet in turn, like syllables.
                    let envelope = ((i % 4000) as i32 - 2000).abs();
                    noise() * level / 40 * envelope / 2000
                }
            };
            samples.push(value.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16);
        }
        if samples.len() >= MAX_SAMPLES {
            samples.truncate(MAX_SAMPLES);
            break;
        }
    }
    samples
}

/// Feeds `samples` in random chunks, storing and loading the state between chunks (both
/// MessagePack layouts); returns the spans and `(spans so far, keep_from_ms)` after each chunk.
pub fn stream(
    config: &VadConfig,
    mut segmenter: Segmenter,
    samples: &[i16],
    seed: u64,
) -> (Vec<Span>, Vec<(usize, u64)>) {
    let mut rng = XorShift(seed | 1);
    let mut spans = Vec::new();
    let mut keeps = Vec::new();
    let mut rest = samples;
    let mut named = false;
    while !rest.is_empty() {
        let n = (rng.below(2000) as usize + 1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        spans.extend(segmenter.push(config, chunk));
        keeps.push((spans.len(), segmenter.keep_from_ms(config)));
        let stored = if named {
            rmp_serde::to_vec_named(&segmenter)
        } else {
            rmp_serde::to_vec(&segmenter)
        }
        .unwrap_or_else(|e| panic!("store: {e}"));
        named = !named;
        segmenter = rmp_serde::from_slice(&stored).unwrap_or_else(|e| panic!("load: {e}"));
    }
    spans.extend(segmenter.finish(config));
    (spans, keeps)
}

fn streaming_equals_batch(config: &VadConfig, samples: &[i16], seed: u64) {
    let batch = segments(config, samples);
    let (streamed, keeps) = stream(config, Segmenter::new(), samples, seed);
    assert_eq!(streamed, batch, "streaming differs from batch ({config:?})");
    let audio_ms = samples.len() as u64 / 16;
    let mut floor = 0;
    for span in &batch {
        assert!(span.start_ms < span.end_ms, "{span:?}");
        assert!(span.start_ms >= floor, "spans overlap: {batch:?}");
        assert!(span.end_ms <= audio_ms, "{span:?} past {audio_ms} ms");
        assert!(
            span.duration_ms() <= u64::from(config.max_utterance_ms),
            "{span:?} longer than {} ms",
            config.max_utterance_ms
        );
        floor = span.end_ms;
    }
    for (emitted, keep) in keeps {
        for later in &batch[emitted..] {
            assert!(keep <= later.start_ms, "keep_from_ms {keep} > {later:?}");
        }
    }
}

fn continue_stored(config: &VadConfig, segmenter: Segmenter, samples: &[i16], seed: u64) {
    let (spans, _) = stream(config, segmenter, samples, seed);
    for span in &spans {
        assert!(span.start_ms < span.end_ms, "{span:?}");
    }
}
