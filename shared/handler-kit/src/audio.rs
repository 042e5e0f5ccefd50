//! WAV in memory: parse, merge, split, and bring to one format.
//!
//! Speech is synthesized per sentence and delivered as one WAV, so the pieces must be joined
//! under a header that is correct for the whole; and NATS messages have a size limit, so long
//! audio is cut into pieces that are each a playable WAV on their own. Speech recognition goes
//! the other way: whatever a client recorded ([`Wav::to_mono_i16`], [`resample`]) becomes the
//! 16 kHz mono 16-bit audio that voice activity detection and Whisper-style models expect, and
//! pieces of it are sent on as small WAV files ([`encode_pcm16`]). Errors are plain strings:
//! only the caller knows whether bad audio is its input's fault or a backend's.

use std::io::Cursor;

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

/// Decoded PCM audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Wav {
    spec: WavSpec,
    samples: Samples,
}

#[derive(Debug, Clone, PartialEq)]
enum Samples {
    Int(Vec<i32>),
    Float(Vec<f32>),
}

impl Samples {
    fn len(&self) -> usize {
        match self {
            Self::Int(s) => s.len(),
            Self::Float(s) => s.len(),
        }
    }
}

/// Size of the canonical 44-byte header hound writes for PCM.
const HEADER_BYTES: usize = 44;

impl Wav {
    /// Parses a WAV file (integer PCM of 8-32 bits, or 32-bit float).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let reader =
            WavReader::new(Cursor::new(bytes)).map_err(|e| format!("not a valid WAV: {e}"))?;
        let spec = reader.spec();
        // hound reads headers it cannot write back (a rate of 0 divides by zero in its writer,
        // valid bits of 32768 are no sample size), and a rate of 0 has no duration: refused
        // here, as bad input, before anything resamples or writes them.
        if spec.sample_rate == 0 || spec.channels == 0 {
            return Err(format!(
                "a WAV of {} Hz and {} channels is not audio",
                spec.sample_rate, spec.channels
            ));
        }
        let fits = match spec.sample_format {
            SampleFormat::Int => (1..=32).contains(&spec.bits_per_sample),
            SampleFormat::Float => spec.bits_per_sample == 32,
        };
        if !fits {
            return Err(format!(
                "{} bits per {:?} sample is not a WAV sample size",
                spec.bits_per_sample, spec.sample_format
            ));
        }
        let samples = match spec.sample_format {
            SampleFormat::Int => Samples::Int(
                reader
                    .into_samples::<i32>()
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("truncated or corrupt WAV data: {e}"))?,
            ),
            SampleFormat::Float => Samples::Float(
                reader
                    .into_samples::<f32>()
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("truncated or corrupt WAV data: {e}"))?,
            ),
        };
        Ok(Self { spec, samples })
    }

    /// The format of the samples.
    pub fn spec(&self) -> WavSpec {
        self.spec
    }

    /// Sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.spec.sample_rate
    }

    /// Number of interleaved channels.
    pub fn channels(&self) -> u16 {
        self.spec.channels
    }

    /// Number of frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.spec.channels.max(1))
    }

    /// Duration in whole milliseconds.
    pub fn duration_ms(&self) -> u64 {
        (self.frames() as u64 * 1000) / u64::from(self.spec.sample_rate.max(1))
    }

    /// Appends `other`, which must have the same format.
    pub fn append(&mut self, other: Self) -> Result<(), String> {
        if other.spec != self.spec {
            return Err(format!(
                "cannot join audio of different formats: {:?} vs {:?}",
                self.spec, other.spec
            ));
        }
        match (&mut self.samples, other.samples) {
            (Samples::Int(a), Samples::Int(b)) => a.extend(b),
            (Samples::Float(a), Samples::Float(b)) => a.extend(b),
            _ => return Err("cannot join integer and float audio".into()),
        }
        Ok(())
    }

    /// Joins pieces in order under one header.
    pub fn concat(pieces: impl IntoIterator<Item = Self>) -> Result<Option<Self>, String> {
        let mut pieces = pieces.into_iter();
        let Some(mut first) = pieces.next() else {
            return Ok(None);
        };
        for piece in pieces {
            first.append(piece)?;
        }
        Ok(Some(first))
    }

    /// Encodes as a WAV file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let mut out = Cursor::new(Vec::with_capacity(HEADER_BYTES + self.data_bytes()));
        {
            let mut writer = WavWriter::new(&mut out, self.spec).map_err(|e| e.to_string())?;
            match &self.samples {
                Samples::Int(s) => {
                    for &v in s {
                        writer.write_sample(v).map_err(|e| e.to_string())?;
                    }
                }
                Samples::Float(s) => {
                    for &v in s {
                        writer.write_sample(v).map_err(|e| e.to_string())?;
                    }
                }
            }
            writer.finalize().map_err(|e| e.to_string())?;
        }
        Ok(out.into_inner())
    }

    /// Mono 16-bit: channels averaged; 8/24/32-bit int and float scaled to i16.
    ///
    /// Integers are shifted to 16 bits (8-bit up by 8, 24-bit down by 8, 32-bit down by 16);
    /// floats in [-1.0, 1.0] are multiplied by 32767 and clipped. Channels are averaged in the
    /// source's resolution before scaling, so no precision is lost twice.
    pub fn to_mono_i16(&self) -> Vec<i16> {
        let channels = usize::from(self.spec.channels.max(1));
        match &self.samples {
            Samples::Int(s) => {
                let bits = u32::from(self.spec.bits_per_sample.clamp(1, 32));
                s.chunks_exact(channels)
                    .map(|frame| {
                        let sum: i64 = frame.iter().map(|&v| i64::from(v)).sum();
                        let mean = sum.div_euclid(channels as i64);
                        let scaled = if bits <= 16 {
                            mean << (16 - bits)
                        } else {
                            mean >> (bits - 16)
                        };
                        saturate(scaled)
                    })
                    .collect()
            }
            Samples::Float(s) => s
                .chunks_exact(channels)
                .map(|frame| {
                    let mean = frame.iter().map(|&v| f64::from(v)).sum::<f64>() / channels as f64;
                    // NaN becomes 0 through the `as` conversion, which also saturates.
                    (mean * f64::from(i16::MAX)).round() as i16
                })
                .collect(),
        }
    }

    fn data_bytes(&self) -> usize {
        self.samples.len() * usize::from(self.spec.bits_per_sample.div_ceil(8))
    }

    /// Splits into WAV files of at most `max_bytes` each (header included), cut on frame
    /// boundaries, so every piece plays on its own.
    pub fn split(&self, max_bytes: usize) -> Result<Vec<Vec<u8>>, String> {
        let frame_bytes = usize::from(self.spec.channels.max(1))
            * usize::from(self.spec.bits_per_sample.div_ceil(8));
        // Headers can grow past 44 bytes for extensible formats; leave room.
        let frames_per_piece =
            (max_bytes.saturating_sub(HEADER_BYTES * 2) / frame_bytes.max(1)).max(1);
        let samples_per_piece = frames_per_piece * usize::from(self.spec.channels.max(1));
        let piece = |samples: Samples| {
            Self {
                spec: self.spec,
                samples,
            }
            .to_bytes()
        };
        match &self.samples {
            Samples::Int(s) if s.is_empty() => Ok(vec![self.to_bytes()?]),
            Samples::Float(s) if s.is_empty() => Ok(vec![self.to_bytes()?]),
            Samples::Int(s) => s
                .chunks(samples_per_piece)
                .map(|c| piece(Samples::Int(c.to_vec())))
                .collect(),
            Samples::Float(s) => s
                .chunks(samples_per_piece)
                .map(|c| piece(Samples::Float(c.to_vec())))
                .collect(),
        }
    }
}

fn saturate(v: i64) -> i16 {
    v.clamp(i64::from(i16::MIN), i64::from(i16::MAX)) as i16
}

/// Resamples mono 16-bit audio from `from_hz` to `to_hz` by linear interpolation.
///
/// Linear interpolation is enough for speech going to VAD and recognition: it is exact at the
/// source samples and cheap (no allocation beyond the output). It applies no anti-aliasing
/// filter, so when downsampling, content above the new Nyquist frequency (8 kHz for 16 kHz
/// output) folds back; speech has little energy there and the recognisers tolerate it, but
/// this is not a resampler for music. The output has `len * to_hz / from_hz` samples, rounded.
/// A rate of zero on either side yields no samples.
pub fn resample(samples: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    if from_hz == 0 || to_hz == 0 || samples.is_empty() {
        return Vec::new();
    }
    if from_hz == to_hz {
        return samples.to_vec();
    }
    let (from, to) = (u64::from(from_hz), u64::from(to_hz));
    let out_len = (samples.len() as u64 * to + from / 2) / from;
    let last = samples.len() - 1;
    (0..out_len)
        .map(|i| {
            // Position i * from / to in the source, kept exact as integer and remainder.
            let pos = i * from;
            let index = usize::try_from(pos / to).unwrap_or(usize::MAX).min(last);
            let frac = (pos % to) as f64 / to as f64;
            let a = f64::from(samples[index]);
            let b = f64::from(samples[(index + 1).min(last)]);
            (a + (b - a) * frac).round() as i16
        })
        .collect()
}

/// A 16-bit mono WAV file of `samples` at `sample_rate`.
pub fn encode_pcm16(samples: &[i16], sample_rate: u32) -> Result<Vec<u8>, String> {
    let spec = WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::with_capacity(HEADER_BYTES + samples.len() * 2));
    {
        let mut writer = WavWriter::new(&mut out, spec).map_err(|e| e.to_string())?;
        let mut pcm = writer.get_i16_writer(
            u32::try_from(samples.len()).map_err(|_| "audio too long for a WAV file")?,
        );
        for &s in samples {
            pcm.write_sample(s);
        }
        pcm.flush().map_err(|e| e.to_string())?;
        writer.finalize().map_err(|e| e.to_string())?;
    }
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    #[test]
    fn headers_that_could_not_be_written_back_are_refused() {
        // Found by fuzzing: a 16-bit mono WAV declaring 0 samples per second parsed, then
        // panicked when written back (hound divides by the rate).
        let rate_zero: &[u8] = b"RIFF\x2a\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x10\x00data\x06\x00\x00\x00\x00\x02\x00\x10\x00\x00";
        let err = Wav::parse(rate_zero).expect_err("refused");
        assert!(err.contains("0 Hz"), "{err}");
        let extensible = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/audio/regression-extensible-valid-bits-32768"
        ))
        .expect("seed");
        assert!(Wav::parse(&extensible).is_err());
    }
    use super::*;

    fn tone(frames: usize, rate: u32) -> Wav {
        let spec = WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: SampleFormat::Int,
        };
        let samples = (0..frames).map(|i| ((i % 100) as i32) * 100).collect();
        Wav {
            spec,
            samples: Samples::Int(samples),
        }
    }

    #[test]
    fn merged_audio_has_a_correct_header_and_keeps_order() {
        let a = tone(1000, 16000);
        let b = tone(600, 16000);
        let merged = Wav::concat([a.clone(), b.clone()])
            .expect("same spec")
            .expect("non-empty");
        let bytes = merged.to_bytes().expect("encode");
        let back = Wav::parse(&bytes).expect("valid");
        assert_eq!(back.frames(), 1600);
        assert_eq!(back.duration_ms(), 100);
        let Samples::Int(s) = back.samples else {
            panic!("int")
        };
        let Samples::Int(sa) = a.samples else {
            panic!("int")
        };
        assert_eq!(&s[..1000], &sa[..]);
    }

    #[test]
    fn different_formats_are_refused() {
        let mut a = tone(10, 16000);
        assert!(a.append(tone(10, 22050)).is_err());
    }

    #[test]
    fn split_pieces_fit_and_play() {
        let a = tone(10_000, 16000);
        let pieces = a.split(4096).expect("split");
        assert!(pieces.len() > 1);
        let mut frames = 0;
        for p in &pieces {
            assert!(p.len() <= 4096, "{}", p.len());
            frames += Wav::parse(p).expect("each piece is a WAV").frames();
        }
        assert_eq!(frames, 10_000);
    }

    fn wav(channels: u16, bits: u16, format: SampleFormat, samples: Samples) -> Wav {
        Wav {
            spec: WavSpec {
                channels,
                sample_rate: 8000,
                bits_per_sample: bits,
                sample_format: format,
            },
            samples,
        }
    }

    #[test]
    fn stereo_is_averaged_and_every_depth_scaled_to_16_bits() {
        let stereo = wav(
            2,
            16,
            SampleFormat::Int,
            Samples::Int(vec![1000, 3000, -500, -1500, 32767, 32767, 7, 8]),
        );
        assert_eq!(stereo.channels(), 2);
        assert_eq!(stereo.to_mono_i16(), vec![2000, -1000, 32767, 7]);

        // 8-bit WAV stores unsigned bytes; hound hands them over as signed -128..=127.
        let mut file = Cursor::new(Vec::new());
        let mut writer = WavWriter::new(
            &mut file,
            WavSpec {
                channels: 1,
                sample_rate: 8000,
                bits_per_sample: 8,
                sample_format: SampleFormat::Int,
            },
        )
        .expect("header");
        for s in [-128i8, 0, 64, 127] {
            writer.write_sample(s).expect("sample");
        }
        writer.finalize().expect("finalize");
        let eight = Wav::parse(&file.into_inner()).expect("valid");
        assert_eq!(eight.to_mono_i16(), vec![-32768, 0, 16384, 32512]);
        let twenty_four = wav(
            1,
            24,
            SampleFormat::Int,
            Samples::Int(vec![-8_388_608, 4096]),
        );
        assert_eq!(twenty_four.to_mono_i16(), vec![-32768, 16]);
        let thirty_two = wav(
            1,
            32,
            SampleFormat::Int,
            Samples::Int(vec![i32::MAX, 1 << 20]),
        );
        assert_eq!(thirty_two.to_mono_i16(), vec![32767, 16]);

        let float = wav(
            2,
            32,
            SampleFormat::Float,
            Samples::Float(vec![
                1.0,
                0.0,
                -1.0,
                -1.0,
                0.25,
                0.25,
                4.0,
                4.0,
                f32::NAN,
                0.0,
            ]),
        );
        assert_eq!(float.to_mono_i16(), vec![16384, -32767, 8192, 32767, 0]);
    }

    fn zero_crossings(samples: &[i16]) -> usize {
        samples
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count()
    }

    #[test]
    fn resampling_keeps_length_ratio_and_pitch() {
        // One second of a 1 kHz sine at 44.1 kHz.
        let sine: Vec<i16> = (0..44_100)
            .map(|n| {
                let t = n as f64 / 44_100.0;
                ((t * 1000.0 * std::f64::consts::TAU).sin() * 10_000.0).round() as i16
            })
            .collect();
        let down = resample(&sine, 44_100, 16_000);
        assert_eq!(down.len(), 16_000);
        // 1000 cycles cross zero twice each: still 1 kHz.
        assert!(
            zero_crossings(&down).abs_diff(2000) <= 2,
            "{}",
            zero_crossings(&down)
        );
        let peak = down.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
        assert!((9_500..=10_000).contains(&peak), "{peak}");

        let up = resample(&down, 16_000, 48_000);
        assert_eq!(up.len(), 48_000);
        assert!(zero_crossings(&up).abs_diff(2000) <= 2);
        // Exact at the source samples.
        assert!(up.iter().step_by(3).zip(&down).all(|(a, b)| a == b));

        assert_eq!(resample(&[1, 2, 3], 22_050, 16_000).len(), 2);
        assert_eq!(resample(&[1, 2, 3], 16_000, 16_000), vec![1, 2, 3]);
        assert!(resample(&[], 8_000, 16_000).is_empty());
        assert!(resample(&[1, 2], 0, 16_000).is_empty());
    }

    #[test]
    fn pcm16_files_round_trip() {
        let samples = [0i16, 1, -1, i16::MAX, i16::MIN];
        let bytes = encode_pcm16(&samples, 16_000).expect("encode");
        assert_eq!(bytes.len(), HEADER_BYTES + samples.len() * 2);
        let back = Wav::parse(&bytes).expect("valid");
        assert_eq!((back.sample_rate(), back.channels()), (16_000, 1));
        assert_eq!(back.to_mono_i16(), samples);
        let empty = encode_pcm16(&[], 16_000).expect("encode");
        assert_eq!(Wav::parse(&empty).expect("valid").frames(), 0);
    }

    #[test]
    fn garbage_and_truncation_are_reported() {
        assert!(Wav::parse(b"RIFF....WAVEnope").is_err());
        let bytes = tone(1000, 16000).to_bytes().expect("encode");
        assert!(Wav::parse(&bytes[..bytes.len() - 101]).is_err());
    }
}
