//! In-memory WAV helpers shared by the inference simulator and by tests: generate
//! deterministic tones, and inspect WAV bytes a service returned.

use std::f32::consts::TAU;
use std::io::Cursor;

use anyhow::{Context, bail};

/// Peak amplitude of generated tones: loud enough to be clearly non-silent, quiet
/// enough not to clip or startle anyone who plays a dev WAV out loud.
const TONE_AMPLITUDE: f32 = 0.3;

/// Format facts about a WAV file, as read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavInfo {
    /// Frames per second.
    pub sample_rate: u32,
    /// Interleaved channels per frame.
    pub channels: u16,
    /// Bits per sample.
    pub bits_per_sample: u16,
    /// Frames (samples per channel).
    pub frames: u32,
    /// Duration in milliseconds, rounded to the nearest millisecond.
    pub duration_ms: u64,
}

/// A 16-bit PCM mono WAV of a sine tone at `freq_hz`.
///
/// The frame count is `duration_ms * sample_rate / 1000` rounded to the nearest
/// frame, so [`wav_info`] reads the same `duration_ms` back for any
/// `sample_rate >= 1000`.
///
/// # Panics
///
/// If the audio would not fit a WAV file (4 GiB of samples), which needs days of
/// audio; callers taking durations from untrusted input should cap them first.
pub fn sine_wav(duration_ms: u32, sample_rate: u32, freq_hz: f32) -> Vec<u8> {
    tone_wav(duration_ms, sample_rate, freq_hz, TONE_AMPLITUDE)
}

/// A 16-bit PCM mono WAV of digital silence.
///
/// # Panics
///
/// Under the same condition as [`sine_wav`].
pub fn silence_wav(duration_ms: u32, sample_rate: u32) -> Vec<u8> {
    tone_wav(duration_ms, sample_rate, 0.0, 0.0)
}

fn tone_wav(duration_ms: u32, sample_rate: u32, freq_hz: f32, amplitude: f32) -> Vec<u8> {
    let frames = (u64::from(duration_ms) * u64::from(sample_rate) + 500) / 1000;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let capacity = usize::try_from(frames.saturating_mul(2).saturating_add(44)).unwrap_or(0);
    let mut cursor = Cursor::new(Vec::with_capacity(capacity));
    {
        let mut writer = hound::WavWriter::new(&mut cursor, spec)
            .expect("writing a WAV header to memory cannot fail");
        let peak = amplitude * f32::from(i16::MAX);
        let step = TAU * freq_hz / sample_rate as f32;
        for n in 0..frames {
            // Reduce the phase per cycle so long tones keep f32 precision and the
            // exact same samples on every platform.
            let phase = ((n as f64 * f64::from(step)) % f64::from(TAU)) as f32;
            let sample = (phase.sin() * peak).round() as i16;
            writer
                .write_sample(sample)
                .expect("in-memory WAV below the 4 GiB RIFF limit");
        }
        writer
            .finalize()
            .expect("in-memory WAV below the 4 GiB RIFF limit");
    }
    cursor.into_inner()
}

/// An 8 or 16-bit PCM WAV of `channels` at `sample_rate` whose data is `data_bytes` long (cut
/// to whole frames): `speech_16k` (16 kHz mono) repeated, taken at the nearest sample for the
/// rate, the same in every channel. For recordings as large as a body cap, in the formats a
/// client may send, that still hold speech a VAD finds; written directly rather than sample by
/// sample through hound, as tens of MiB are.
///
/// # Panics
///
/// If `bits` is not 8 or 16, `speech_16k` is empty, or the data would not fit a WAV file.
pub fn tiled_speech_wav(
    speech_16k: &[i16],
    sample_rate: u32,
    channels: u16,
    bits: u16,
    data_bytes: usize,
) -> Vec<u8> {
    assert!(matches!(bits, 8 | 16), "8 or 16 bits, not {bits}");
    assert!(!speech_16k.is_empty(), "no speech to repeat");
    let sample_bytes = usize::from(bits / 8);
    let frame_bytes = sample_bytes * usize::from(channels);
    let frames = data_bytes / frame_bytes;
    let data_len = u32::try_from(frames * frame_bytes).expect("data under 4 GiB");
    let mut wav = Vec::with_capacity(44 + frames * frame_bytes);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&channels.to_le_bytes());
    wav.extend_from_slice(&sample_rate.to_le_bytes());
    let block_align = u16::try_from(frame_bytes).expect("a small frame");
    wav.extend_from_slice(&(sample_rate * u32::from(block_align)).to_le_bytes());
    wav.extend_from_slice(&block_align.to_le_bytes());
    wav.extend_from_slice(&bits.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for n in 0..frames as u64 {
        let at = (n * 16_000 / u64::from(sample_rate)) as usize % speech_16k.len();
        let sample = speech_16k[at];
        for _ in 0..channels {
            if bits == 8 {
                // 8-bit WAV is unsigned, centred on 128.
                wav.push(((sample >> 8) + 128) as u8);
            } else {
                wav.extend_from_slice(&sample.to_le_bytes());
            }
        }
    }
    wav
}

/// Reads the header of WAV `bytes`.
pub fn wav_info(bytes: &[u8]) -> anyhow::Result<WavInfo> {
    let reader = hound::WavReader::new(Cursor::new(bytes)).context("not a readable WAV file")?;
    let spec = reader.spec();
    if spec.sample_rate == 0 {
        bail!("WAV header declares a sample rate of 0");
    }
    let frames = reader.duration();
    let rate = u64::from(spec.sample_rate);
    Ok(WavInfo {
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        bits_per_sample: spec.bits_per_sample,
        frames,
        duration_ms: (u64::from(frames) * 1000 + rate / 2) / rate,
    })
}

/// All samples of an integer PCM WAV of at most 16 bits, interleaved by channel.
pub fn samples_i16(bytes: &[u8]) -> anyhow::Result<Vec<i16>> {
    let mut reader =
        hound::WavReader::new(Cursor::new(bytes)).context("not a readable WAV file")?;
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample > 16 {
        bail!(
            "expected integer PCM of at most 16 bits, got {:?} with {} bits",
            spec.sample_format,
            spec.bits_per_sample
        );
    }
    reader
        .samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .context("truncated or corrupt WAV sample data")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location
mod tests {
    use super::*;

    #[test]
    fn sine_round_trips_format_and_duration() {
        let bytes = sine_wav(250, 16_000, 440.0);
        let info = wav_info(&bytes).unwrap();
        assert_eq!(
            info,
            WavInfo {
                sample_rate: 16_000,
                channels: 1,
                bits_per_sample: 16,
                frames: 4_000,
                duration_ms: 250,
            }
        );
        let samples = samples_i16(&bytes).unwrap();
        assert_eq!(samples.len(), 4_000);
        let peak = samples.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!(peak > 5_000 && peak < 12_000, "peak {peak}");
    }

    #[test]
    fn sine_is_deterministic() {
        assert_eq!(sine_wav(100, 22_050, 523.25), sine_wav(100, 22_050, 523.25));
        assert_ne!(sine_wav(100, 22_050, 523.25), sine_wav(100, 22_050, 440.0));
    }

    #[test]
    fn silence_is_silent() {
        let bytes = silence_wav(100, 8_000);
        assert_eq!(wav_info(&bytes).unwrap().duration_ms, 100);
        assert!(samples_i16(&bytes).unwrap().iter().all(|s| *s == 0));
    }

    #[test]
    fn zero_duration_is_a_valid_empty_wav() {
        let info = wav_info(&sine_wav(0, 22_050, 440.0)).unwrap();
        assert_eq!((info.frames, info.duration_ms), (0, 0));
    }

    #[test]
    fn tiled_speech_has_the_size_and_format_asked_for() {
        let speech: Vec<i16> = (0..1600).map(|i| (i * 20 - 16_000) as i16).collect();
        for (rate, channels, bits) in [(44_100, 2, 8), (48_000, 1, 16)] {
            let bytes = tiled_speech_wav(&speech, rate, channels, bits, 100_001);
            let info = wav_info(&bytes).unwrap();
            let frame = usize::from(channels * bits / 8);
            assert_eq!(bytes.len(), 44 + 100_001 / frame * frame);
            assert_eq!(
                (info.sample_rate, info.channels, info.bits_per_sample),
                (rate, channels, bits)
            );
            let samples = samples_i16(&bytes).unwrap();
            // hound reads 8-bit samples as -128..=127.
            let first = if bits == 8 { -16_000 >> 8 } else { -16_000 };
            assert_eq!(samples[0], first);
            assert_eq!(samples.len(), 100_001 / frame * usize::from(channels));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(wav_info(b"definitely not a wav").is_err());
        assert!(samples_i16(b"").is_err());
    }
}
