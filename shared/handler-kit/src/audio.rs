//! WAV in memory: parse, merge, split.
//!
//! Speech is synthesized per sentence and delivered as one WAV, so the pieces must be joined
//! under a header that is correct for the whole; and NATS messages have a size limit, so long
//! audio is cut into pieces that are each a playable WAV on their own. Errors are plain strings:
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn garbage_and_truncation_are_reported() {
        assert!(Wav::parse(b"RIFF....WAVEnope").is_err());
        let bytes = tone(1000, 16000).to_bytes().expect("encode");
        assert!(Wav::parse(&bytes[..bytes.len() - 101]).is_err());
    }
}
