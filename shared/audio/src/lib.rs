//! WAV in memory: parse, merge, split, and bring to one format.
//!
//! Speech is synthesized per sentence and delivered as one WAV, so the pieces must be joined
//! under a header that is correct for the whole; and NATS messages have a size limit, so long
//! audio is cut into pieces that are each a playable WAV on their own. Speech recognition goes
//! the other way: whatever a client recorded ([`Wav::to_mono_i16`], [`resample`]) becomes the
//! 16 kHz mono 16-bit audio that voice activity detection and Whisper-style models expect, and
//! pieces of it are sent on as small WAV files ([`encode_pcm16`]). Errors are plain strings:
//! only the caller knows whether bad audio is its input's fault or a backend's.
//!
//! A request's recording can be as large as the body cap (32 MiB), so the speech path never
//! copies it: [`AudioBytes`] is the request's `audio` field borrowed from the body it arrived
//! in (MessagePack `bin` as it lies, base64 text decoded as it is read), and [`Downmix`]
//! reads it frame by frame straight into 16 kHz mono, the only copy of the audio that is made.

use std::borrow::Cow;
use std::io::{BufReader, Cursor, Read};

use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::STANDARD;
use base64::read::DecoderReader;
use hound::{SampleFormat, WavIntoSamples, WavReader, WavSpec, WavWriter};
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

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
        check_spec(spec, container_bits(bytes))?;
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
    ///
    /// The whole is allocated once, at its final size, and each piece is let go as soon as it
    /// was copied: growing the first piece instead would hold the old and the new buffer at
    /// each doubling, up to twice the result besides the pieces.
    pub fn concat(pieces: impl IntoIterator<Item = Self>) -> Result<Option<Self>, String> {
        let pieces: Vec<Self> = pieces.into_iter().collect();
        let total: usize = pieces.iter().map(|p| p.samples.len()).sum();
        let mut pieces = pieces.into_iter();
        let Some(first) = pieces.next() else {
            return Ok(None);
        };
        let mut merged = Self {
            spec: first.spec,
            samples: match &first.samples {
                Samples::Int(_) => Samples::Int(Vec::with_capacity(total)),
                Samples::Float(_) => Samples::Float(Vec::with_capacity(total)),
            },
        };
        merged.append(first)?;
        for piece in pieces {
            merged.append(piece)?;
        }
        Ok(Some(merged))
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
                    .map(|frame| mono_int(frame, bits))
                    .collect()
            }
            Samples::Float(s) => s.chunks_exact(channels).map(mono_float).collect(),
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

/// One frame of integer samples of `bits` bits as one 16-bit sample: channels averaged in the
/// source's resolution, then shifted to 16 bits.
fn mono_int(frame: &[i32], bits: u32) -> i16 {
    let sum: i64 = frame.iter().map(|&v| i64::from(v)).sum();
    let mean = sum.div_euclid(frame.len().max(1) as i64);
    let scaled = if bits <= 16 {
        mean << (16 - bits)
    } else {
        mean >> (bits - 16)
    };
    saturate(scaled)
}

/// One frame of float samples as one 16-bit sample.
fn mono_float(frame: &[f32]) -> i16 {
    let mean = frame.iter().map(|&v| f64::from(v)).sum::<f64>() / frame.len().max(1) as f64;
    // NaN becomes 0 through the `as` conversion, which also saturates.
    (mean * f64::from(i16::MAX)).round() as i16
}

/// Refuses a format hound reads but cannot decode or write back, as bad input: a rate of 0
/// (no duration; hound's writer divides by it), no channels, a byte rate over 32 bits (its
/// writer overflows), valid bits over the container an extensible header declares (up to
/// 65535 are read), and any sample size but 8, 16, 24 or 32-bit integer and 32-bit float
/// (the only ones it decodes and encodes). `container_bits` is the container's size where the
/// header could be read for it.
fn check_spec(spec: WavSpec, container_bits: Option<u32>) -> Result<(), String> {
    if spec.sample_rate == 0 || spec.channels == 0 {
        return Err(format!(
            "a WAV of {} Hz and {} channels is not audio",
            spec.sample_rate, spec.channels
        ));
    }
    let bits = u32::from(spec.bits_per_sample);
    if let Some(container) = container_bits.filter(|&c| bits > c) {
        return Err(format!(
            "the header declares {bits} valid bits per sample in a {container}-bit container"
        ));
    }
    let fits = match spec.sample_format {
        SampleFormat::Int => matches!(bits, 8 | 16 | 24 | 32),
        SampleFormat::Float => bits == 32,
    };
    if !fits {
        return Err(format!(
            "{bits} bits per {:?} sample is not a supported WAV sample size (8, 16, 24 or 32-bit \
             integer, 32-bit float)",
            spec.sample_format
        ));
    }
    let byte_rate =
        u64::from(spec.sample_rate) * u64::from(spec.channels) * u64::from(bits.div_ceil(8));
    if byte_rate > u64::from(u32::MAX) {
        return Err(format!(
            "{} Hz of {} channels is {byte_rate} bytes per second, more than a WAV can declare",
            spec.sample_rate, spec.channels
        ));
    }
    Ok(())
}

/// The chunks of a RIFF/WAVE file up to the one named `id`: that chunk's body (cut short at
/// the end of `wav`), if it can be found.
fn riff_chunk<'a>(wav: &'a [u8], id: &[u8; 4]) -> Option<&'a [u8]> {
    if wav.get(0..4)? != b"RIFF" || wav.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut at = 12usize;
    while let Some(header) = wav.get(at..at.checked_add(8)?) {
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let body = at + 8;
        if &header[0..4] == id {
            return wav.get(body..body.saturating_add(len).min(wav.len()));
        }
        // Chunks are padded to an even length.
        at = body.checked_add(len)?.checked_add(len % 2)?;
    }
    None
}

/// The format code in the `fmt ` chunk of a RIFF/WAVE file, if one can be found.
pub fn format_tag(wav: &[u8]) -> Option<u16> {
    let fmt = riff_chunk(wav, b"fmt ")?;
    Some(u16::from_le_bytes([*fmt.first()?, *fmt.get(1)?]))
}

/// The size of one sample's container in bits (block align / channels), from the `fmt ` chunk.
fn container_bits(wav: &[u8]) -> Option<u32> {
    let fmt = riff_chunk(wav, b"fmt ")?;
    let channels = u16::from_le_bytes([*fmt.get(2)?, *fmt.get(3)?]);
    let block_align = u16::from_le_bytes([*fmt.get(12)?, *fmt.get(13)?]);
    (channels > 0).then(|| u32::from(block_align / channels) * 8)
}

/// Linear interpolation fed one sample at a time: exactly [`resample`]'s output, without
/// holding the input.
///
/// An output sample can be computed once the two input samples around its position are in,
/// but it belongs to the output only if [`resample`]'s rounded length for the input so far
/// reaches it: when downsampling by more than 2x, the last computed sample can lie past that
/// length (44.1 kHz and 96 kHz input do this at some lengths). Such a sample is held, at most
/// one, and released once more input makes the length reach it, or dropped at the end.
#[derive(Debug, Clone)]
struct Resampler {
    from: u64,
    to: u64,
    /// Index of the next output sample to compute.
    next_out: u64,
    /// Output samples handed out.
    emitted: u64,
    /// Input samples received.
    received: u64,
    previous: i16,
    /// Computed, not yet within the output's length.
    held: Option<i16>,
}

impl Resampler {
    fn new(from_hz: u32, to_hz: u32) -> Self {
        Self {
            from: u64::from(from_hz),
            to: u64::from(to_hz),
            next_out: 0,
            emitted: 0,
            received: 0,
            previous: 0,
            held: None,
        }
    }

    /// [`resample`]'s output length for `frames` input samples.
    fn len_for(&self, frames: u64) -> u64 {
        if self.from == 0 || self.to == 0 {
            return 0;
        }
        (frames * self.to + self.from / 2) / self.from
    }

    /// Hands `value` out if the output's length for the input so far reaches it, else holds it.
    fn emit(&mut self, value: i16, allowed: u64, out: &mut Vec<i16>) {
        if self.emitted < allowed {
            out.push(value);
            self.emitted += 1;
        } else {
            debug_assert!(
                self.held.is_none(),
                "at most one sample lies past the length"
            );
            self.held = Some(value);
        }
    }

    /// Takes input sample number `received`: every output sample lying between it and the
    /// one before is now known.
    fn push(&mut self, sample: i16, out: &mut Vec<i16>) {
        let allowed = self.len_for(self.received + 1);
        if let Some(held) = self.held.take() {
            self.emit(held, allowed, out);
        }
        if self.received > 0 && self.from > 0 && self.to > 0 {
            let index = self.received - 1;
            let (a, b) = (f64::from(self.previous), f64::from(sample));
            while (self.next_out * self.from) / self.to == index {
                let frac = ((self.next_out * self.from) % self.to) as f64 / self.to as f64;
                self.emit((a + (b - a) * frac).round() as i16, allowed, out);
                self.next_out += 1;
            }
        }
        self.previous = sample;
        self.received += 1;
    }

    /// End of input: a held sample past the final length is dropped; the output samples at or
    /// past the last input sample are that sample.
    fn finish(&mut self, out: &mut Vec<i16>) {
        if self.received == 0 {
            return;
        }
        let out_len = self.len_for(self.received);
        if let Some(held) = self.held.take()
            && self.emitted < out_len
        {
            out.push(held);
            self.emitted += 1;
        }
        while self.emitted < out_len {
            out.push(self.previous);
            self.emitted += 1;
        }
    }
}

/// Output samples [`resample`] makes of `frames` input samples.
fn resampled_len(frames: u64, from_hz: u32, to_hz: u32) -> u64 {
    if from_hz == 0 || to_hz == 0 {
        return 0;
    }
    let (from, to) = (u64::from(from_hz), u64::from(to_hz));
    if from == to {
        frames
    } else {
        (frames * to + from / 2) / from
    }
}

/// A request's audio as it arrived, borrowed from the event's data where it can be: MessagePack
/// `bin` (or JSON's array of byte values) as bytes, a JSON string as base64 text, checked
/// when decoded and decoded again, in small pieces, each time it is read.
///
/// Deserializes from what `event::bytes_field` accepts (and refuses the same: bad base64 is an
/// error of the data); the text is only borrowed when it has no JSON escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioBytes<'a> {
    /// The file's bytes.
    Raw(Cow<'a, [u8]>),
    /// The file's bytes as standard base64 with padding (surrounding whitespace trimmed).
    Base64(Cow<'a, str>),
}

impl Default for AudioBytes<'_> {
    fn default() -> Self {
        Self::Raw(Cow::Borrowed(&[]))
    }
}

impl AudioBytes<'_> {
    /// Length of the file in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Raw(bytes) => bytes.len(),
            Self::Base64(text) => {
                let padding = text.bytes().rev().take_while(|&b| b == b'=').count();
                (text.len() / 4 * 3).saturating_sub(padding)
            }
        }
    }

    /// Whether there is no audio at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file, read from where it lies.
    pub fn reader(&self) -> AudioReader<'_> {
        match self {
            Self::Raw(bytes) => AudioReader::Bytes(bytes),
            Self::Base64(text) => AudioReader::Base64(Box::new(BufReader::with_capacity(
                8 * 1024,
                DecoderReader::new(text.as_bytes(), &STANDARD),
            ))),
        }
    }

    /// Up to the first `n` bytes of the file (to look at its header).
    pub fn head(&self, n: usize) -> Cow<'_, [u8]> {
        match self {
            Self::Raw(bytes) => Cow::Borrowed(&bytes[..n.min(bytes.len())]),
            Self::Base64(_) => {
                let mut head = Vec::with_capacity(n.min(self.len()));
                // The text was checked when it was decoded: reading cannot fail.
                let _ = self.reader().take(n as u64).read_to_end(&mut head);
                Cow::Owned(head)
            }
        }
    }
}

/// Reads an [`AudioBytes`].
pub enum AudioReader<'a> {
    /// Bytes as they lie.
    Bytes(&'a [u8]),
    /// Base64 text decoded as it is read.
    Base64(Box<BufReader<DecoderReader<'static, GeneralPurpose, &'a [u8]>>>),
}

impl Read for AudioReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Bytes(bytes) => bytes.read(buf),
            Self::Base64(reader) => reader.read(buf),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for AudioBytes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AudioVisitor)
    }
}

struct AudioVisitor;

impl AudioVisitor {
    /// Checks base64 text by decoding it into nothing: the error is the data's, here, as
    /// `bytes_field` reports it, and later reads of it cannot fail.
    fn checked<E: de::Error>(text: &str) -> Result<(), E> {
        std::io::copy(
            &mut DecoderReader::new(text.as_bytes(), &STANDARD),
            &mut std::io::sink(),
        )
        .map(drop)
        .map_err(|e| E::custom(format!("invalid base64: {e}")))
    }
}

impl<'de> Visitor<'de> for AudioVisitor {
    type Value = AudioBytes<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("bytes or a base64 string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(AudioBytes::Raw(Cow::Borrowed(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(AudioBytes::Raw(Cow::Owned(v.to_vec())))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(AudioBytes::Raw(Cow::Owned(v)))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        let v = v.trim();
        Self::checked(v)?;
        Ok(AudioBytes::Base64(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let v = v.trim();
        Self::checked(v)?;
        Ok(AudioBytes::Base64(Cow::Owned(v.to_string())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // As `bytes_field`: the claimed length reserves at most 64 KiB.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(AudioBytes::Raw(Cow::Owned(out)))
    }
}

enum SampleSource<R: Read> {
    Int(WavIntoSamples<R, i32>, u32),
    Float(WavIntoSamples<R, f32>),
}

/// A WAV decoded as it is read, straight to mono 16-bit at one rate: the same samples as
/// [`Wav::parse`], [`Wav::to_mono_i16`] and [`resample`] in turn, without their three copies
/// of the audio.
pub struct Downmix<R: Read> {
    spec: WavSpec,
    declared_frames: u64,
    source: SampleSource<R>,
    frame_int: Vec<i32>,
    frame_float: Vec<f32>,
    resampler: Resampler,
    frames_read: u64,
    done: bool,
}

impl<R: Read> Downmix<R> {
    /// Reads the header. Call [`Self::check`] before decoding.
    pub fn new(reader: R, to_hz: u32) -> Result<Self, hound::Error> {
        let reader = WavReader::new(reader)?;
        let spec = reader.spec();
        let declared_frames = u64::from(reader.duration());
        let channels = usize::from(spec.channels.max(1));
        let source = match spec.sample_format {
            SampleFormat::Int => SampleSource::Int(
                reader.into_samples(),
                u32::from(spec.bits_per_sample.clamp(1, 32)),
            ),
            SampleFormat::Float => SampleSource::Float(reader.into_samples()),
        };
        Ok(Self {
            spec,
            declared_frames,
            source,
            frame_int: Vec::with_capacity(channels),
            frame_float: Vec::with_capacity(channels),
            resampler: Resampler::new(spec.sample_rate, to_hz),
            frames_read: 0,
            done: false,
        })
    }

    /// Refuses a format that cannot be decoded or written back (as [`Wav::parse`] does);
    /// `head`, the file's first bytes, is where an extensible header's container size is read.
    pub fn check(&self, head: &[u8]) -> Result<(), String> {
        check_spec(self.spec, container_bits(head))
    }

    /// The header's format.
    pub fn spec(&self) -> WavSpec {
        self.spec
    }

    /// Frames the header declares (the data may hold fewer: it is then truncated).
    pub fn declared_frames(&self) -> u64 {
        self.declared_frames
    }

    /// Output samples `frames` input frames make.
    pub fn output_len(&self, frames: u64) -> u64 {
        resampled_len(frames, self.spec.sample_rate, self.resampler.to as u32)
    }

    /// Frames decoded so far.
    pub fn frames_read(&self) -> u64 {
        self.frames_read
    }

    /// Decodes up to `max_frames` more frames, appending what they make to `out`; at the end
    /// of the data, the last output samples too. Returns whether the end was reached.
    pub fn read_into(&mut self, out: &mut Vec<i16>, max_frames: usize) -> Result<bool, String> {
        if self.done {
            return Ok(true);
        }
        let channels = usize::from(self.spec.channels.max(1));
        let corrupt = |e: hound::Error| format!("truncated or corrupt WAV data: {e}");
        for _ in 0..max_frames {
            // A last frame missing some of its channels is dropped, as `to_mono_i16` does.
            let sample = match &mut self.source {
                SampleSource::Int(samples, bits) => {
                    self.frame_int.clear();
                    for sample in samples.by_ref().take(channels) {
                        self.frame_int.push(sample.map_err(corrupt)?);
                    }
                    (self.frame_int.len() == channels).then(|| mono_int(&self.frame_int, *bits))
                }
                SampleSource::Float(samples) => {
                    self.frame_float.clear();
                    for sample in samples.by_ref().take(channels) {
                        self.frame_float.push(sample.map_err(corrupt)?);
                    }
                    (self.frame_float.len() == channels).then(|| mono_float(&self.frame_float))
                }
            };
            match sample {
                Some(sample) => {
                    self.resampler.push(sample, out);
                    self.frames_read += 1;
                }
                None => {
                    self.resampler.finish(out);
                    self.done = true;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
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
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as STANDARD_ENGINE;

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

    /// A WAV whose extensible header declares `valid_bits` in a container of `container`
    /// bits, with `data` as its samples.
    fn extensible(container: u16, valid_bits: u16, data: &[u8]) -> Vec<u8> {
        let block_align = container / 8;
        let mut fmt = Vec::new();
        fmt.extend(0xfffeu16.to_le_bytes());
        fmt.extend(1u16.to_le_bytes());
        fmt.extend(8000u32.to_le_bytes());
        fmt.extend((8000 * u32::from(block_align)).to_le_bytes());
        fmt.extend(block_align.to_le_bytes());
        fmt.extend(container.to_le_bytes());
        fmt.extend(22u16.to_le_bytes());
        fmt.extend(valid_bits.to_le_bytes());
        fmt.extend(4u32.to_le_bytes());
        fmt.extend([
            1, 0, 0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xaa, 0, 0x38, 0x9b, 0x71,
        ]);
        let mut wav = b"RIFF".to_vec();
        wav.extend((4 + 8 + fmt.len() as u32 + 8 + data.len() as u32).to_le_bytes());
        wav.extend(b"WAVEfmt ");
        wav.extend((fmt.len() as u32).to_le_bytes());
        wav.extend(fmt);
        wav.extend(b"data");
        wav.extend((data.len() as u32).to_le_bytes());
        wav.extend(data);
        wav
    }

    #[test]
    fn valid_bits_over_the_container_or_sizes_hound_cannot_write_are_refused() {
        // 16 valid bits in an 8-bit container: hound reads the header (and no samples), and
        // would write the file back as something else.
        let err = Wav::parse(&extensible(8, 16, &[])).expect_err("refused");
        assert!(
            err.contains("16 valid bits") && err.contains("8-bit"),
            "{err}"
        );
        let err = Wav::parse(&extensible(8, 16, &[1, 2])).expect_err("refused");
        assert!(err.contains("container"), "{err}");
        // 12 valid bits in a 16-bit container: neither decoded nor written by hound.
        let err = Wav::parse(&extensible(16, 12, &[])).expect_err("refused");
        assert!(err.contains("12 bits"), "{err}");
        // What is accepted writes back and parses to the same format.
        let ok = Wav::parse(&extensible(16, 16, &[1, 0, 2, 0])).expect("16 in 16");
        let back = Wav::parse(&ok.to_bytes().expect("encode")).expect("parse back");
        assert_eq!(back, ok);
        // The streaming decoder refuses the same.
        let downmix = Downmix::new(Cursor::new(extensible(8, 16, &[])), 16_000).expect("header");
        assert!(downmix.check(&extensible(8, 16, &[])).is_err());
    }

    fn wav_bytes(spec: WavSpec, frames: usize) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut writer = WavWriter::new(&mut out, spec).expect("header");
        let channels = usize::from(spec.channels);
        for i in 0..frames * channels {
            let wave =
                ((i / channels) as f64 * 0.05).sin() * if i % channels == 0 { 0.7 } else { -0.4 };
            match (spec.sample_format, spec.bits_per_sample) {
                (SampleFormat::Float, _) => writer.write_sample(wave as f32),
                (_, bits) => {
                    let max = f64::from((1u32 << (bits - 1)) - 1);
                    writer.write_sample((wave * max) as i32)
                }
            }
            .expect("sample");
        }
        writer.finalize().expect("finalize");
        out.into_inner()
    }

    #[test]
    fn streaming_decoding_gives_the_samples_of_parse_downmix_and_resample() {
        for (channels, rate, bits, format) in [
            (2, 44_100, 8, SampleFormat::Int),
            (1, 48_000, 16, SampleFormat::Int),
            (2, 8_000, 24, SampleFormat::Int),
            (3, 22_050, 32, SampleFormat::Int),
            (2, 16_000, 32, SampleFormat::Float),
        ] {
            let spec = WavSpec {
                channels,
                sample_rate: rate,
                bits_per_sample: bits,
                sample_format: format,
            };
            let bytes = wav_bytes(spec, 10_007);
            let parsed = Wav::parse(&bytes).expect("valid");
            let batch = resample(&parsed.to_mono_i16(), rate, 16_000);
            for audio in [
                AudioBytes::Raw(Cow::Borrowed(&bytes)),
                AudioBytes::Base64(Cow::Owned(STANDARD_ENGINE.encode(&bytes))),
            ] {
                assert_eq!(audio.len(), bytes.len());
                assert_eq!(&*audio.head(44), &bytes[..44]);
                let mut downmix = Downmix::new(audio.reader(), 16_000).expect("header");
                downmix.check(&audio.head(64)).expect("supported");
                assert_eq!(downmix.declared_frames(), 10_007);
                let mut out = Vec::new();
                // In uneven slices, as the caller reads them.
                while !downmix.read_into(&mut out, 997).expect("decodes") {}
                assert_eq!(out.len() as u64, downmix.output_len(10_007));
                assert_eq!(out, batch, "{spec:?}");
            }
        }
    }

    #[test]
    fn the_streaming_resampler_gives_resample_s_output_at_every_length() {
        // Downsampling by more than 2x computes a sample past the rounded length at some
        // lengths: 79 of these 600 at 44.1 kHz, 100 at 96 kHz (a 4.29 GHz header found it).
        for from in [
            8_000,
            16_000,
            22_050,
            44_100,
            48_000,
            96_000,
            192_000,
            4_294_959_295,
        ] {
            let input: Vec<i16> = (0..600)
                .map(|i| ((i * 7919) % 65_536 - 32_768) as i16)
                .collect();
            for len in 0..input.len() {
                let samples = &input[..len];
                let mut resampler = Resampler::new(from, 16_000);
                let mut out = Vec::new();
                for &sample in samples {
                    resampler.push(sample, &mut out);
                    // Nothing handed out lies past the length of the input so far.
                    assert!(out.len() as u64 <= resampler.len_for(resampler.received));
                }
                resampler.finish(&mut out);
                assert_eq!(
                    out,
                    resample(samples, from, 16_000),
                    "{len} samples at {from} Hz"
                );
            }
        }
    }

    #[test]
    fn audio_fields_borrow_bytes_and_base64_and_refuse_bad_base64() {
        #[derive(serde::Deserialize)]
        struct Field<'a> {
            #[serde(borrow)]
            audio: AudioBytes<'a>,
        }
        let json = br#"{"audio": " UklGRg== "}"#;
        let field: Field = serde_json::from_slice(json).expect("json");
        assert!(matches!(
            &field.audio,
            AudioBytes::Base64(Cow::Borrowed("UklGRg=="))
        ));
        assert_eq!(&*field.audio.head(10), b"RIFF");
        let err = serde_json::from_slice::<Field>(br#"{"audio": "%%%"}"#)
            .err()
            .expect("bad base64");
        assert!(err.to_string().contains("invalid base64"), "{err}");
        let msgpack = [0x81, 0xa5, b'a', b'u', b'd', b'i', b'o', 0xc4, 2, 7, 9];
        let mut d = rmp_serde::Deserializer::from_read_ref(&msgpack[..]);
        let field = Field::deserialize(&mut d).expect("msgpack");
        assert!(matches!(
            &field.audio,
            AudioBytes::Raw(Cow::Borrowed([7, 9]))
        ));
        let array: Field = serde_json::from_slice(br#"{"audio": [1, 2, 3]}"#).expect("array");
        assert_eq!(array.audio, AudioBytes::Raw(Cow::Owned(vec![1, 2, 3])));
    }

    #[test]
    fn garbage_and_truncation_are_reported() {
        assert!(Wav::parse(b"RIFF....WAVEnope").is_err());
        let bytes = tone(1000, 16000).to_bytes().expect("encode");
        assert!(Wav::parse(&bytes[..bytes.len() - 101]).is_err());
    }
}
