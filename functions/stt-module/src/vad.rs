//! Voice activity detection: where the speech is in 16 kHz mono audio.
//!
//! Transcription backends spend time (and money) on every second they are sent, and
//! Whisper-style models invent words in long silences. So recordings are cut into utterances
//! first and only those are sent. Frames are judged by WebRTC's VAD (libfvad, through
//! `webrtc-vad`) together with a noise-floor gate; the rest (padding, hangover, dropping clicks,
//! cutting overlong utterances) is a small state machine here.
//!
//! The state machine is the [`Segmenter`], built for streaming across replicas: a session's
//! segmenter is stored (MessagePack, in a NATS KV bucket) between audio chunks and any replica
//! may continue it. Its state is therefore a handful of integers plus at most one partial frame
//! of samples; it never holds audio. That shapes how frames are judged:
//!
//! - libfvad adapts to the background inside its C state, which cannot be stored. So it is
//!   reset before every frame and only says whether a frame *sounds like* speech. On its own,
//!   a reset libfvad calls any audible noise speech (measured on the fixtures: their hiss at
//!   -60 dBFS RMS was "speech" in every frame).
//! - The adapting is done here instead, in storable integers: a noise floor that follows the
//!   quietest frames at once and rises slowly (about 3 dB/s) otherwise, as in minimum-statistics
//!   noise estimation. A frame is voiced when libfvad says so *and* its energy is above the floor
//!   by a margin that grows with [`VadConfig::mode`] (6, 8, 10, 12 dB for modes 0 to 3).
//!
//! Judging frames from stored state only is also what makes streaming give exactly the same
//! spans as [`segments`] over the whole recording, however the audio was chunked.

use serde::{Deserialize, Serialize};
use webrtc_vad::{SampleRate, Vad, VadMode};

use handler_kit::config::ConfigReader;

/// The only sample rate the segmenter accepts: what speech recognisers expect, and one of the
/// rates libfvad handles natively.
pub const VAD_RATE: u32 = 16_000;

/// Samples per millisecond at [`VAD_RATE`].
const SAMPLES_PER_MS: u64 = VAD_RATE as u64 / 1000;

/// How audio is cut into utterances.
#[derive(Debug, Clone)]
pub struct VadConfig {
    /// `STT_VAD_MODE` (0-3, default 2): aggressiveness; both WebRTC's VAD mode and the margin
    /// a voiced frame needs above the noise floor (6, 8, 10, 12 dB). Higher reports speech less
    /// readily, which suits noisy input but may clip soft word endings and very short words.
    pub mode: u8,
    /// `STT_VAD_FRAME_MS` (10, 20 or 30; default 30): length of one frame the VAD judges.
    pub frame_ms: u32,
    /// `STT_VAD_PADDING_MS` (default 200): audio kept before and after the speech, so soft
    /// onsets and endings the VAD misses still reach the recogniser.
    pub padding_ms: u32,
    /// `STT_VAD_SILENCE_MS` (default 500): silence that closes an utterance (the hangover);
    /// shorter pauses, between words or for breath, stay inside it.
    pub min_silence_ms: u32,
    /// `STT_VAD_MIN_SPEECH_MS` (default 200): an utterance with less voice than this is
    /// dropped as a click or noise.
    pub min_speech_ms: u32,
    /// `STT_MAX_UTTERANCE_MS` (default 20000): an utterance is cut at this length (padding
    /// included), because recognisers work on windows of about 30 s.
    pub max_utterance_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            mode: 2,
            frame_ms: 30,
            padding_ms: 200,
            min_silence_ms: 500,
            min_speech_ms: 200,
            max_utterance_ms: 20_000,
        }
    }
}

impl VadConfig {
    /// Reads the `STT_VAD_*` variables and `STT_MAX_UTTERANCE_MS`.
    pub fn read(r: &mut ConfigReader) -> Self {
        let d = Self::default();
        let mut mode: u8 = r.parse("STT_VAD_MODE", d.mode);
        if mode > 3 {
            r.problem(format!("STT_VAD_MODE={mode} is invalid: expected 0 to 3"));
            mode = d.mode;
        }
        let mut frame_ms: u32 = r.parse("STT_VAD_FRAME_MS", d.frame_ms);
        if !matches!(frame_ms, 10 | 20 | 30) {
            r.problem(format!(
                "STT_VAD_FRAME_MS={frame_ms} is invalid: expected 10, 20 or 30"
            ));
            frame_ms = d.frame_ms;
        }
        let padding_ms = r.parse("STT_VAD_PADDING_MS", d.padding_ms);
        let min_silence_ms = r.parse("STT_VAD_SILENCE_MS", d.min_silence_ms);
        if min_silence_ms < frame_ms {
            r.problem(format!(
                "STT_VAD_SILENCE_MS={min_silence_ms} is invalid: must be at least one frame \
                 (STT_VAD_FRAME_MS={frame_ms})"
            ));
        }
        let min_speech_ms = r.parse("STT_VAD_MIN_SPEECH_MS", d.min_speech_ms);
        let max_utterance_ms = r.parse("STT_MAX_UTTERANCE_MS", d.max_utterance_ms);
        if max_utterance_ms < 1000 || max_utterance_ms / 2 <= padding_ms {
            r.problem(format!(
                "STT_MAX_UTTERANCE_MS={max_utterance_ms} is invalid: must be at least 1000 and \
                 more than twice STT_VAD_PADDING_MS={padding_ms}"
            ));
        }
        Self {
            mode,
            frame_ms,
            padding_ms,
            min_silence_ms,
            min_speech_ms,
            max_utterance_ms,
        }
    }

    /// The frame length, falling back to 30 ms for a value libfvad would refuse (only a
    /// hand-built config can hold one; [`VadConfig::read`] reports it).
    fn frame(&self) -> u64 {
        match self.frame_ms {
            10 | 20 | 30 => u64::from(self.frame_ms),
            _ => 30,
        }
    }

    fn frame_samples(&self) -> usize {
        // At most 480: the cast cannot truncate.
        (self.frame() * SAMPLES_PER_MS) as usize
    }
}

/// One utterance: milliseconds from the first sample, padding included, clamped to the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// Where the utterance (with its leading padding) starts.
    pub start_ms: u64,
    /// Where it (with its trailing padding) ends; always after `start_ms`.
    pub end_ms: u64,
}

impl Span {
    /// Length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }

    /// The samples of this span in 16 kHz audio that starts at ms 0, clamped to `samples`.
    pub fn slice<'a>(&self, samples: &'a [i16]) -> &'a [i16] {
        let index = |ms: u64| usize::try_from(ms * SAMPLES_PER_MS).unwrap_or(usize::MAX);
        let end = index(self.end_ms).min(samples.len());
        let start = index(self.start_ms).min(end);
        &samples[start..end]
    }
}

/// Streaming segmenter; its state is small and serializable because sessions keep it in a
/// NATS KV bucket between chunks (any replica may continue a session). It never stores audio
/// beyond one partial frame.
///
/// Unknown or missing fields deserialize to their defaults (`#[serde(default)]`), so a state
/// written by an older or newer replica still loads during a rolling update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Segmenter {
    /// Milliseconds of whole frames judged so far.
    processed_ms: u64,
    /// Samples of a frame not yet complete (fewer than one frame).
    partial: Vec<i16>,
    /// Whether an utterance is open.
    in_speech: bool,
    /// Where the open utterance's span starts (leading padding included).
    utterance_start_ms: u64,
    /// End of the last voiced frame.
    last_voice_end_ms: u64,
    /// Voiced milliseconds in the open utterance (compared with `min_speech_ms`).
    voiced_ms: u64,
    /// Unvoiced milliseconds since the last voiced frame (compared with `min_silence_ms`).
    silence_ms: u64,
    /// End of the last span returned: later spans never start before it, so none overlap.
    floor_ms: u64,
    /// Background energy (mean square sample value) as estimated so far; 0 before any frame.
    noise_energy: u64,
}

impl Segmenter {
    /// A segmenter at the start of a recording.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds 16 kHz mono samples that follow everything fed so far; returns the utterances
    /// this closed (by `min_silence_ms` of silence, or `max_utterance_ms`), in order. Times
    /// are ms since the first sample ever fed.
    pub fn push(&mut self, config: &VadConfig, samples: &[i16]) -> Vec<Span> {
        let frame_len = config.frame_samples();
        let mut detector = Detector::new(config.mode);
        let mut spans = Vec::new();
        let mut rest = samples;
        if !self.partial.is_empty() {
            // Complete the partial frame first. (It can only hold a frame or more if the frame
            // length changed between chunks; then it is judged as whole frames too.)
            let mut head = std::mem::take(&mut self.partial);
            let missing = (frame_len - head.len() % frame_len) % frame_len;
            let (fill, tail) = rest.split_at(missing.min(rest.len()));
            head.extend_from_slice(fill);
            rest = tail;
            let mut frames = head.chunks_exact(frame_len);
            for frame in &mut frames {
                self.frame(config, &mut detector, frame, &mut spans);
            }
            self.partial = frames.remainder().to_vec();
        }
        if !rest.is_empty() {
            let mut frames = rest.chunks_exact(frame_len);
            for frame in &mut frames {
                self.frame(config, &mut detector, frame, &mut spans);
            }
            self.partial = frames.remainder().to_vec();
        }
        spans
    }

    /// End of audio: closes an utterance in progress (if it has at least `min_speech_ms` of
    /// voice). The trailing partial frame is too short to judge but counts as audio, so the
    /// span's padding may reach into it, though never past `max_utterance_ms` from the
    /// span's start: the limit holds for the last span too.
    pub fn finish(&mut self, config: &VadConfig) -> Vec<Span> {
        let mut spans = Vec::new();
        if self.in_speech {
            let audio_end = self.processed_ms + self.partial.len() as u64 / SAMPLES_PER_MS;
            let longest = self.utterance_start_ms + u64::from(config.max_utterance_ms);
            self.close(config, audio_end.min(longest), &mut spans);
        }
        spans
    }

    /// Audio before this ms can never be part of a future span (the caller may drop it).
    ///
    /// A future span is either the open utterance (starting at its start) or one that opens
    /// later, whose leading padding reaches at most `padding_ms` before the audio not yet
    /// judged (and never before the end of the last span returned). Both count while an
    /// utterance is open: it may still be dropped for too little voice, and an utterance
    /// carried on after a cut at `max_utterance_ms` starts where the cut was, which can be
    /// later than the next utterance's padding.
    pub fn keep_from_ms(&self, config: &VadConfig) -> u64 {
        let next = self
            .processed_ms
            .saturating_sub(u64::from(config.padding_ms))
            .max(self.floor_ms);
        if self.in_speech {
            self.utterance_start_ms.min(next)
        } else {
            next
        }
    }

    /// ms of audio processed so far (whole frames; a trailing partial frame is not counted).
    pub fn processed_ms(&self) -> u64 {
        self.processed_ms
    }

    fn frame(
        &mut self,
        config: &VadConfig,
        detector: &mut Detector,
        frame: &[i16],
        spans: &mut Vec<Span>,
    ) {
        let start = self.processed_ms;
        let frame_ms = config.frame();
        let max = u64::from(config.max_utterance_ms);
        if self.in_speech
            && start > self.utterance_start_ms
            && start + frame_ms - self.utterance_start_ms > max
        {
            // This frame would take the utterance past its limit: cut before it, and go on
            // with a new utterance from where the cut one ends (no padding, no overlap).
            let silence_ms = self.silence_ms;
            let cut_end = self.close(config, start, spans);
            self.in_speech = true;
            self.utterance_start_ms = cut_end.unwrap_or(start);
            self.silence_ms = silence_ms;
        }
        let voiced = self.judge(config, detector, frame);
        self.processed_ms += frame_ms;
        if voiced {
            if !self.in_speech {
                self.in_speech = true;
                self.utterance_start_ms = start
                    .saturating_sub(u64::from(config.padding_ms))
                    .max(self.floor_ms);
                self.voiced_ms = 0;
            }
            self.voiced_ms += frame_ms;
            self.silence_ms = 0;
            self.last_voice_end_ms = self.processed_ms;
        } else if self.in_speech {
            self.silence_ms += frame_ms;
            if self.silence_ms >= u64::from(config.min_silence_ms) {
                self.close(config, self.processed_ms, spans);
            }
        }
    }

    /// Whether `frame` is speech: libfvad's verdict gated by the noise floor, which is then
    /// updated with the frame's energy.
    fn judge(&mut self, config: &VadConfig, detector: &mut Detector, frame: &[i16]) -> bool {
        let energy = mean_square(frame);
        if self.noise_energy == 0 {
            // First frame: usually background, but capped in case speech starts at once.
            self.noise_energy = energy.clamp(MIN_NOISE_ENERGY, FIRST_NOISE_ENERGY_CAP);
        }
        let margin = MARGIN_PERCENT[usize::from(config.mode.min(3))];
        let loud_enough = energy * 100 > self.noise_energy * margin;
        let voiced = loud_enough && detector.is_voice(frame);
        if energy < self.noise_energy {
            self.noise_energy = energy.max(MIN_NOISE_ENERGY);
        } else {
            for _ in 0..config.frame() / 10 {
                self.noise_energy += self.noise_energy / NOISE_RISE_DIVISOR_PER_10MS + 1;
            }
        }
        voiced
    }

    /// Ends the open utterance at most at `limit`; if it had enough voice, adds its span and
    /// returns where that ends.
    fn close(&mut self, config: &VadConfig, limit: u64, spans: &mut Vec<Span>) -> Option<u64> {
        let mut emitted = None;
        if self.voiced_ms > 0 && self.voiced_ms >= u64::from(config.min_speech_ms) {
            let end = (self.last_voice_end_ms + u64::from(config.padding_ms)).min(limit);
            if end > self.utterance_start_ms {
                spans.push(Span {
                    start_ms: self.utterance_start_ms,
                    end_ms: end,
                });
                self.floor_ms = end;
                emitted = Some(end);
            }
        }
        self.in_speech = false;
        self.voiced_ms = 0;
        self.silence_ms = 0;
        emitted
    }
}

/// Energy above the noise floor a voiced frame needs, as a power ratio in percent, by mode:
/// 6, 8, 10 and 12 dB. With the fixtures' faint hiss every mode finds every word and no noise;
/// under a -35 dBFS hiss mode 2 (10 dB) still finds each sentence, in pieces the hangover
/// joins, while mode 3 loses the shortest words.
const MARGIN_PERCENT: [u64; 4] = [398, 631, 1000, 1585];

/// The floor never goes below this (RMS 10, -70 dBFS), so digital silence does not make the
/// faintest dither count as speech.
const MIN_NOISE_ENERGY: u64 = 100;

/// The first frame sets the floor, but at most to this (RMS 580, -35 dBFS): a recording that
/// starts mid-word must not take the word for its background.
const FIRST_NOISE_ENERGY_CAP: u64 = 580 * 580;

/// Per 10 ms above the floor, the floor rises by 1/130 (0.033 dB, so about 3.3 dB/s): fast
/// enough to follow a fan switched on, slow enough that speech, whose quiet moments pull the
/// floor straight back down, cannot lift it.
const NOISE_RISE_DIVISOR_PER_10MS: u64 = 130;

/// Mean of the squared samples: the frame's energy, in integers so stored state is exact.
fn mean_square(frame: &[i16]) -> u64 {
    let sum: u64 = frame
        .iter()
        .map(|&s| u64::from(s.unsigned_abs()).pow(2))
        .sum();
    sum / (frame.len() as u64).max(1)
}

/// Whole-recording segmentation (push + finish).
pub fn segments(config: &VadConfig, samples_16k: &[i16]) -> Vec<Span> {
    let mut segmenter = Segmenter::new();
    let mut spans = segmenter.push(config, samples_16k);
    spans.extend(segmenter.finish(config));
    spans
}

/// libfvad, reset before every frame so its verdict depends on that frame alone (see the
/// module docs). Not `Send`: it lives only inside one synchronous `push`.
struct Detector {
    vad: Vad,
    mode: u8,
}

impl Detector {
    fn new(mode: u8) -> Self {
        Self {
            vad: Vad::new_with_rate_and_mode(SampleRate::Rate16kHz, vad_mode(mode)),
            mode,
        }
    }

    fn is_voice(&mut self, frame: &[i16]) -> bool {
        self.vad.reset();
        self.vad.set_sample_rate(SampleRate::Rate16kHz);
        self.vad.set_mode(vad_mode(self.mode));
        // Frames are always 10, 20 or 30 ms, the lengths libfvad accepts; were one refused,
        // it is treated as silence rather than invented speech.
        self.vad.is_voice_segment(frame).unwrap_or(false)
    }
}

fn vad_mode(mode: u8) -> VadMode {
    match mode {
        0 => VadMode::Quality,
        1 => VadMode::LowBitrate,
        2 => VadMode::Aggressive,
        _ => VadMode::VeryAggressive,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location
mod tests {
    use super::*;
    use audio::{Wav, resample};
    use handler_kit::config::load;

    /// How far a detected boundary may be from the one the fixture README records.
    const TOLERANCE_MS: u64 = 300;

    fn fixture_16k(name: &str) -> Vec<i16> {
        let wav = Wav::parse(&testkit::fixtures::speech(name)).unwrap();
        resample(&wav.to_mono_i16(), wav.sample_rate(), VAD_RATE)
    }

    /// Spans within tolerance of the README's speech boundaries widened by the padding.
    fn assert_matches_fixture(name: &str, config: &VadConfig, spans: &[Span]) {
        let known = testkit::fixtures::speech_boundaries(name);
        assert_eq!(spans.len(), known.len(), "{name}: {spans:?} vs {known:?}");
        let padding = u64::from(config.padding_ms);
        for (span, (start, end)) in spans.iter().zip(&known) {
            let (want_start, want_end) = (start.saturating_sub(padding), end + padding);
            assert!(
                span.start_ms.abs_diff(want_start) <= TOLERANCE_MS
                    && span.end_ms.abs_diff(want_end) <= TOLERANCE_MS,
                "{name}: {span:?} vs expected {want_start}..{want_end} (speech {start}..{end})"
            );
        }
    }

    #[test]
    fn finds_each_utterance_of_the_fixtures() {
        for name in ["two-utterances-16k.wav", "three-utterances-44k-stereo.wav"] {
            let samples = fixture_16k(name);
            for config in [
                VadConfig::default(),
                VadConfig {
                    padding_ms: 0,
                    frame_ms: 10,
                    ..VadConfig::default()
                },
                VadConfig {
                    mode: 0,
                    frame_ms: 20,
                    ..VadConfig::default()
                },
            ] {
                assert_matches_fixture(name, &config, &segments(&config, &samples));
            }
        }
    }

    #[test]
    fn finds_them_under_a_loud_hiss_too() {
        for name in ["two-utterances-16k.wav", "three-utterances-44k-stereo.wav"] {
            // Uniform noise of +-1000 (RMS 577, -35 dBFS) on top of the fixture's own.
            let mut rng = XorShift(12_345);
            let noisy: Vec<i16> = fixture_16k(name)
                .iter()
                .map(|&s| s.saturating_add(rng.below(2001) as i16 - 1000))
                .collect();
            let config = VadConfig::default();
            assert_matches_fixture(name, &config, &segments(&config, &noisy));
        }
    }

    /// A small deterministic generator, so the chunking is random but the same on every run.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn streaming_through_stored_state_gives_the_batch_spans() {
        let samples = fixture_16k("two-utterances-16k.wav");
        for config in [
            VadConfig::default(),
            VadConfig {
                frame_ms: 20,
                // Short enough to cut the first sentence, so cuts are streamed too.
                max_utterance_ms: 1500,
                ..VadConfig::default()
            },
        ] {
            let batch = segments(&config, &samples);
            assert!(!batch.is_empty());
            let mut rng = XorShift(0x5eed_1234_abcd_0042);
            let mut stored = rmp_serde::to_vec(&Segmenter::new()).unwrap();
            let mut streamed = Vec::new();
            // (emitted-at processed_ms, keep_from_ms) after every chunk, checked below.
            let mut keeps = Vec::new();
            let mut rest = &samples[..];
            while !rest.is_empty() {
                // 1 to 2000 samples: mostly not a whole number of frames.
                let n = (rng.below(2000) as usize + 1).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let mut segmenter: Segmenter = rmp_serde::from_slice(&stored).unwrap();
                assert!(segmenter.partial.len() < config.frame_samples());
                streamed.extend(segmenter.push(&config, chunk));
                keeps.push((streamed.len(), segmenter.keep_from_ms(&config)));
                stored = rmp_serde::to_vec(&segmenter).unwrap();
            }
            let mut segmenter: Segmenter = rmp_serde::from_slice(&stored).unwrap();
            streamed.extend(segmenter.finish(&config));
            assert_eq!(streamed, batch, "{config:?}");
            // A keep_from_ms seen after `emitted` spans must not exceed any later span's start.
            for (emitted, keep) in keeps {
                for later in &streamed[emitted..] {
                    assert!(keep <= later.start_ms, "keep {keep} > {later:?}");
                }
            }
        }
    }

    #[test]
    fn stored_state_stays_small() {
        let samples = fixture_16k("two-utterances-16k.wav");
        let config = VadConfig::default();
        let mut segmenter = Segmenter::new();
        segmenter.push(&config, &samples[..16_000 + 479]);
        let bytes = rmp_serde::to_vec(&segmenter).unwrap();
        // 479 samples of partial frame at most 3 bytes each, plus a few numbers.
        assert!(bytes.len() < 1_600, "{}", bytes.len());
    }

    #[test]
    fn long_speech_is_cut_at_the_limit_without_overlap() {
        let samples = fixture_16k("two-utterances-16k.wav");
        let config = VadConfig {
            max_utterance_ms: 1000,
            ..VadConfig::default()
        };
        let spans = segments(&config, &samples);
        assert!(spans.len() >= 5, "{spans:?}");
        for span in &spans {
            assert!(span.duration_ms() <= 1000, "{span:?}");
        }
        assert!(spans.windows(2).all(|w| w[0].end_ms <= w[1].start_ms));
    }

    #[test]
    fn silence_noise_and_clicks_give_no_spans() {
        let config = VadConfig::default();
        assert_eq!(segments(&config, &[]), vec![]);
        assert_eq!(segments(&config, &vec![0; 48_000]), vec![]);
        // A 60 ms click of loud noise in silence: voiced, but shorter than min_speech_ms.
        let mut samples = vec![0i16; 32_000];
        let mut rng = XorShift(7);
        for s in &mut samples[16_000..16_960] {
            *s = (rng.below(20_000) as i16) - 10_000;
        }
        let voiced = Detector::new(config.mode).is_voice(&samples[16_000..16_480]);
        assert!(voiced, "the click must at least look like voice");
        assert_eq!(segments(&config, &samples), vec![]);
    }

    #[test]
    fn an_utterance_open_at_the_end_is_closed_by_finish() {
        let samples = fixture_16k("two-utterances-16k.wav");
        let config = VadConfig::default();
        let known = testkit::fixtures::speech_boundaries("two-utterances-16k.wav");
        // Stop half a second into the second sentence.
        let cut = usize::try_from((known[1].0 + 500) * SAMPLES_PER_MS).unwrap() + 7;
        let mut segmenter = Segmenter::new();
        let closed = segmenter.push(&config, &samples[..cut]);
        assert_eq!(closed.len(), 1);
        let last = segmenter.finish(&config);
        assert_eq!(last.len(), 1);
        assert_eq!(
            last[0].end_ms,
            cut as u64 / SAMPLES_PER_MS,
            "clamped to the audio"
        );
        assert_eq!(
            segmenter.finish(&config),
            vec![],
            "finish twice closes nothing"
        );
    }

    /// Uniform noise of +-10000: loud enough that every frame of it is voiced.
    fn noise(rng: &mut XorShift, ms: u64) -> Vec<i16> {
        (0..ms * SAMPLES_PER_MS)
            .map(|_| rng.below(20_001) as i16 - 10_000)
            .collect()
    }

    #[test]
    fn the_last_span_closed_by_finish_keeps_to_the_length_limit() {
        // Found by fuzzing: voice to the very end, cut at the limit once, then the rest of the
        // audio (29 ms of it an unjudged partial frame) closed by finish: that span was 1019 ms
        // with a limit of 1000.
        let config = VadConfig {
            max_utterance_ms: 1000,
            ..VadConfig::default()
        };
        let mut rng = XorShift(99);
        let mut samples = noise(&mut rng, 2009);
        samples.extend([1000; 8]);
        let spans = segments(&config, &samples);
        // Cut at 990 ms; the rest, to 2009 ms, is closed by finish at the limit.
        assert_eq!(
            spans,
            vec![
                Span {
                    start_ms: 0,
                    end_ms: 990
                },
                Span {
                    start_ms: 990,
                    end_ms: 1990
                }
            ]
        );
    }

    #[test]
    fn keep_from_never_passes_the_padding_of_the_utterance_after_a_dropped_cut() {
        // Found by fuzzing: 150 ms of voice (too little to keep), a silence just short of
        // closing it when the length limit cuts it at 990 ms; the utterance carried on from
        // the cut is dropped a frame later, and the next one, voiced from 1080 ms, starts at
        // 880 ms with its padding. Between the cut and the drop keep_from_ms said 990.
        let config = VadConfig {
            padding_ms: 200,
            min_silence_ms: 900,
            min_speech_ms: 200,
            max_utterance_ms: 1000,
            ..VadConfig::default()
        };
        let mut rng = XorShift(5);
        let mut samples = noise(&mut rng, 150);
        samples.extend(vec![0; 930 * 16]);
        samples.extend(noise(&mut rng, 420));
        samples.extend(vec![0; 1200 * 16]);
        let batch = segments(&config, &samples);
        assert_eq!(
            batch,
            vec![Span {
                start_ms: 880,
                end_ms: 1700
            }]
        );
        let mut segmenter = Segmenter::new();
        let mut emitted = 0;
        for frame in samples.chunks(480) {
            emitted += segmenter.push(&config, frame).len();
            let keep = segmenter.keep_from_ms(&config);
            for later in &batch[emitted..] {
                assert!(
                    keep <= later.start_ms,
                    "at {} ms: keep {keep} > {later:?}",
                    segmenter.processed_ms()
                );
            }
        }
    }

    #[test]
    fn config_is_read_and_checked() {
        let config = load(&[("STT_VAD_MODE", "3"), ("STT_VAD_FRAME_MS", "10")], |r| {
            VadConfig::read(r)
        })
        .unwrap();
        assert_eq!((config.mode, config.frame_ms), (3, 10));
        assert_eq!(config.max_utterance_ms, 20_000);
        let err = load(
            &[
                ("STT_VAD_MODE", "4"),
                ("STT_VAD_FRAME_MS", "25"),
                ("STT_VAD_SILENCE_MS", "5"),
                ("STT_MAX_UTTERANCE_MS", "300"),
            ],
            VadConfig::read,
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        assert!(err.0[0].contains("STT_VAD_MODE=4"), "{err}");
    }
}
