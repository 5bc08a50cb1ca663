//! WAV in and out (via `hound`), and the wav2vec 2.0 input normalisation.
//!
//! Decoding: integer PCM of 8, 16, 24 or 32 bits becomes `x / 2^(bits - 1)` (8-bit WAV stores
//! unsigned bytes; hound recentres them, so the value is `(byte - 128) / 128`); 32-bit float is
//! taken as is. Channels are averaged to mono in f64, then rounded to f32 once. Anything else
//! (A-law, mu-law, ADPCM, 64-bit float, odd bit depths, 0 Hz, 0 channels, no samples, NaN or
//! infinite floats, a data chunk cut short) is an error naming the file and the problem.
//!
//! Whole or in pieces: [`read_wav`] and [`load_16k`] return the whole file; [`WavStream`] (native rate)
//! and [`open_16k`] (16 kHz) give the same samples, bit for bit, in pieces of any size, in memory that
//! does not grow with the file (for long recordings).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::resample::{output_len, Resampler};

/// Mono audio at its native rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

/// The sample rate wav2vec 2.0 expects.
pub const TARGET_RATE: u32 = 16000;

/// Reads a WAV file as mono f32 (see the module docs for the conversions and the errors).
pub fn read_wav(path: &Path) -> Result<Audio> {
    let mut stream = WavStream::open(path)?;
    // A lying header cannot make us allocate more than the file could hold.
    let mut samples = Vec::with_capacity(stream.frames().min(stream.file_len as usize));
    while stream.read_frames(&mut samples, usize::MAX)? > 0 {}
    Ok(Audio {
        samples,
        sample_rate: stream.sample_rate(),
    })
}

/// Reads a WAV file and resamples it to 16 kHz mono (no resampling when it already is 16 kHz).
pub fn load_16k(path: &Path) -> Result<Vec<f32>> {
    let audio = read_wav(path)?;
    if audio.sample_rate == TARGET_RATE {
        return Ok(audio.samples);
    }
    Ok(super::resample::resample(
        &audio.samples,
        audio.sample_rate,
        TARGET_RATE,
    ))
}

/// A WAV file read piece by piece as mono f32 at its own rate: the same header checks, conversions and errors
/// as [`read_wav`] (which is built on it), in memory that does not grow with the file. A data chunk cut short
/// or a bad sample is reported when the reading reaches it.
pub struct WavStream {
    reader: hound::WavReader<BufReader<File>>,
    path: PathBuf,
    file_len: u64,
    sample_rate: u32,
    float: bool,
    channels: usize,
    /// Interleaved samples in the data chunk, as the header says, and how many were read.
    total: usize,
    read: usize,
    /// `1 / 2^(bits - 1)` for integers.
    scale: f64,
    /// A failed stream repeats its error rather than carrying on after it.
    failed: Option<String>,
}

impl WavStream {
    /// Opens and validates the header (format, rate, channels, a non-empty data chunk).
    pub fn open(path: &Path) -> Result<WavStream> {
        let shown = path.display();
        let file = File::open(path).with_context(|| format!("{shown}: cannot open"))?;
        let file_len = file.metadata().with_context(|| format!("{shown}: cannot stat"))?.len();
        if file_len == 0 {
            bail!("{shown}: empty file (0 bytes), not a WAV file");
        }
        let reader = match hound::WavReader::new(BufReader::new(file)) {
            Ok(r) => r,
            Err(e) => {
                let why = diagnose_header(path).unwrap_or_else(|| format!("invalid WAV header ({e})"));
                bail!("{shown}: {why}");
            }
        };
        let spec = reader.spec();
        let channels = spec.channels as usize;
        if spec.sample_rate == 0 {
            bail!("{shown}: sample rate is 0 Hz");
        }
        if channels == 0 {
            bail!("{shown}: 0 channels");
        }
        match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Int, 8 | 16 | 24 | 32) | (hound::SampleFormat::Float, 32) => {}
            (hound::SampleFormat::Int, bits) => {
                bail!("{shown}: unsupported encoding: {bits}-bit integer PCM (only 8/16/24/32)")
            }
            (hound::SampleFormat::Float, bits) => {
                bail!("{shown}: unsupported encoding: {bits}-bit float (only 32-bit)")
            }
        }
        let total = reader.len() as usize;
        if total == 0 {
            bail!("{shown}: contains no audio samples (empty data chunk)");
        }
        Ok(WavStream {
            reader,
            path: path.to_path_buf(),
            file_len,
            sample_rate: spec.sample_rate,
            float: spec.sample_format == hound::SampleFormat::Float,
            channels,
            total,
            read: 0,
            scale: 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f64,
            failed: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Mono frames the header promises.
    pub fn frames(&self) -> usize {
        self.total / self.channels
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> usize {
        self.read / self.channels
    }

    /// Appends up to `n` mono frames to `out` and returns how many: 0 once the data chunk is exhausted. On an
    /// error (a data chunk cut short, a non-finite float), `out` holds the frames decoded before it, and every
    /// later call repeats the error.
    pub fn read_frames(&mut self, out: &mut Vec<f32>, n: usize) -> Result<usize> {
        if let Some(e) = &self.failed {
            bail!("{e}");
        }
        let result = self.decode(out, n);
        if let Err(e) = &result {
            self.failed = Some(format!("{e:#}"));
        }
        result
    }

    fn decode(&mut self, out: &mut Vec<f32>, n: usize) -> Result<usize> {
        let ch = self.channels;
        let frames = (self.frames() - self.frames_read()).min(n);
        // Whole frames only: hound refuses a data chunk that does not hold whole frames.
        let count = frames * ch;
        if count == 0 {
            return Ok(0);
        }
        out.reserve(frames);
        let (shown, total, first) = (self.path.display(), self.total, self.read);
        let truncated = |held: usize| {
            anyhow!(
                "{shown}: truncated: header says {total} samples ({} frames x {ch} channels), file holds {held}",
                total / ch
            )
        };
        let inv_ch = 1.0 / ch as f64;
        let mut acc = 0f64;
        if self.float {
            for (k, s) in self.reader.samples::<f32>().take(count).enumerate() {
                let idx = first + k;
                let v = match s {
                    Ok(v) => v,
                    Err(hound::Error::IoError(e)) if is_eof(&e) => return Err(truncated(idx)),
                    Err(e) => bail!("{shown}: cannot decode sample {idx}: {e}"),
                };
                if !v.is_finite() {
                    bail!(
                        "{shown}: sample {idx} (frame {}, channel {}) is {v}; float WAVs must hold finite values",
                        idx / ch,
                        idx % ch
                    );
                }
                acc += v as f64;
                if (idx + 1) % ch == 0 {
                    out.push((acc * inv_ch) as f32);
                    acc = 0.0;
                }
            }
        } else {
            let scale = self.scale;
            for (k, s) in self.reader.samples::<i32>().take(count).enumerate() {
                let idx = first + k;
                let v = match s {
                    Ok(v) => v,
                    Err(hound::Error::IoError(e)) if is_eof(&e) => return Err(truncated(idx)),
                    Err(e) => bail!("{shown}: cannot decode sample {idx}: {e}"),
                };
                acc += v as f64 * scale;
                if (idx + 1) % ch == 0 {
                    out.push((acc * inv_ch) as f32);
                    acc = 0.0;
                }
            }
        }
        self.read += count;
        Ok(frames)
    }
}

/// A WAV file read piece by piece as 16 kHz mono f32: [`WavStream`] through a [`Resampler`], so the samples
/// are bit-identical to [`load_16k`]'s whatever the pieces, and memory is about one requested piece plus the
/// resampler's filter and table, however long the file.
pub struct Stream16k {
    wav: WavStream,
    /// `None` at 16 kHz (no resampling) and after the end.
    resampler: Option<Resampler>,
    native: Vec<f32>,
    /// Resampled samples not yet handed out.
    pending: VecDeque<f32>,
    /// The file is read to its end and the resampler finished (only `pending` is left).
    ended: bool,
    /// A read error met inside a block: returned once `pending` cannot fill a request.
    deferred: Option<anyhow::Error>,
    given: usize,
}

/// Frames decoded per step at the native rate (bounds the memory of very high rates).
const NATIVE_BLOCK: usize = 1 << 16;

/// Opens `path` for reading as 16 kHz mono in pieces (see [`Stream16k`]).
pub fn open_16k(path: &Path) -> Result<Stream16k> {
    let wav = WavStream::open(path)?;
    let rate = wav.sample_rate();
    Ok(Stream16k {
        resampler: (rate != TARGET_RATE).then(|| Resampler::new(rate, TARGET_RATE)),
        wav,
        native: Vec::new(),
        pending: VecDeque::new(),
        ended: false,
        deferred: None,
        given: 0,
    })
}

impl Stream16k {
    pub fn path(&self) -> &Path {
        self.wav.path()
    }

    /// The file's own rate.
    pub fn native_rate(&self) -> u32 {
        self.wav.sample_rate()
    }

    pub fn channels(&self) -> usize {
        self.wav.channels()
    }

    /// 16 kHz samples the whole file gives, from its header (exact unless the data chunk is cut short, which
    /// reading reports as an error).
    pub fn len(&self) -> usize {
        output_len(self.wav.frames(), self.wav.sample_rate(), TARGET_RATE)
    }

    /// Never true: an empty data chunk is refused when opening.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// 16 kHz samples handed out so far.
    pub fn position(&self) -> usize {
        self.given
    }

    /// Appends up to `n` samples to `out` and returns how many: fewer than `n` only at the end (then 0). A
    /// read error (a data chunk cut short, a NaN) is returned by the first request that reaches it, after
    /// every whole request before it; `out` is then left as it was.
    pub fn read(&mut self, out: &mut Vec<f32>, n: usize) -> Result<usize> {
        if self.resampler.is_none() && !self.ended {
            // 16 kHz: straight from the file.
            let before = out.len();
            match self.wav.read_frames(out, n) {
                Ok(got) => {
                    self.given += got;
                    return Ok(got);
                }
                Err(e) => {
                    out.truncate(before);
                    return Err(e);
                }
            }
        }
        let mut staged = Vec::new();
        while self.pending.len() < n && !self.ended && self.deferred.is_none() {
            self.native.clear();
            let read = self.wav.read_frames(&mut self.native, NATIVE_BLOCK);
            let mut r = self.resampler.take().expect("resampling until the end");
            match read {
                Ok(0) => {
                    r.finish(&mut staged);
                    self.ended = true;
                }
                Ok(_) => {
                    r.push(&self.native, &mut staged);
                    self.resampler = Some(r);
                }
                Err(e) => {
                    // What was decoded before the error still counts.
                    r.push(&self.native, &mut staged);
                    self.resampler = Some(r);
                    self.deferred = Some(e);
                }
            }
            self.pending.extend(staged.drain(..));
        }
        if self.pending.len() < n {
            if let Some(e) = &self.deferred {
                return Err(anyhow!("{e:#}"));
            }
        }
        let k = n.min(self.pending.len());
        out.extend(self.pending.drain(..k));
        self.given += k;
        Ok(k)
    }
}

/// Zero-mean unit-variance normalisation as transformers' `Wav2Vec2FeatureExtractor`
/// (`do_normalize=True`): `(x - mean) / sqrt(var + 1e-7)` with the biased variance (numpy's
/// `.var()`). Statistics and the result are computed in f64, then rounded to f32 (transformers works
/// in f32, so results may differ by an ulp or so). An empty slice is left alone.
pub fn normalize(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    let inv_std = 1.0 / (var + 1e-7).sqrt();
    for v in x.iter_mut() {
        *v = ((*v as f64 - mean) * inv_std) as f32;
    }
}

/// Writes mono 32-bit float samples (which must be finite). Written to a temporary file in the same
/// folder, then renamed, so a reader never sees half a file.
pub fn write_wav_f32(path: &Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: refusing to write non-finite sample {i} ({})",
            path.display(),
            samples[i]
        );
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    write_atomically(path, spec, |w| {
        for &v in samples {
            w.write_sample(v)?;
        }
        Ok(())
    })
}

/// Writes mono 16-bit PCM: each sample becomes `round(x * 32768)` clamped to the i16 range (the
/// inverse of reading, exact for values read from a 16-bit file). NaN is an error.
pub fn write_wav_i16(path: &Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    if let Some(i) = samples.iter().position(|v| v.is_nan()) {
        bail!("{}: refusing to write NaN sample {i}", path.display());
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    write_atomically(path, spec, |w| {
        for &v in samples {
            w.write_sample((v as f64 * 32768.0).round().clamp(-32768.0, 32767.0) as i16)?;
        }
        Ok(())
    })
}

type Writer = hound::WavWriter<std::io::BufWriter<File>>;

fn write_atomically(
    path: &Path,
    spec: hound::WavSpec,
    fill: impl FnOnce(&mut Writer) -> hound::Result<()>,
) -> Result<()> {
    let shown = path.display();
    if spec.sample_rate == 0 {
        bail!("{shown}: cannot write a WAV at 0 Hz");
    }
    let name = path.file_name().ok_or_else(|| anyhow!("{shown}: not a file path"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| -> hound::Result<()> {
        let mut w = hound::WavWriter::create(&tmp, spec)?;
        fill(&mut w)?;
        w.finalize()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("{shown}: cannot write WAV: {e}");
    }
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("{shown}: cannot rename {} into place", tmp.display())
    })
}

/// Walks the RIFF header the way hound does, to say precisely what is wrong after hound refused the
/// file. `None` if it finds nothing specific (the caller then shows hound's own message).
fn diagnose_header(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let file_len = f.metadata().ok()?.len();
    let mut head = [0u8; 12];
    let got = read_up_to(&mut f, &mut head);
    if got < 4 || &head[..4] != b"RIFF" {
        return Some(match &head[..got.min(4)] {
            b"RIFX" => "big-endian RIFX WAV is not supported".to_string(),
            b"RF64" => "RF64 (64-bit WAV) is not supported".to_string(),
            _ => format!(
                "not a WAV file (starts with {} instead of \"RIFF\")",
                show_bytes(&head[..got])
            ),
        });
    }
    if got < 12 {
        return Some(format!(
            "truncated header: file is only {file_len} bytes, the RIFF header needs 12"
        ));
    }
    if &head[8..12] != b"WAVE" {
        return Some(format!(
            "not a WAV file: RIFF form type is {}, not \"WAVE\"",
            show_bytes(&head[8..12])
        ));
    }
    let mut pos = 12u64;
    let mut have_fmt = false;
    loop {
        let mut ch = [0u8; 8];
        if read_up_to(&mut f, &mut ch) < 8 {
            return Some(format!(
                "truncated header: file ends at byte {file_len} before {}",
                if have_fmt {
                    "the \"data\" chunk"
                } else {
                    "the \"fmt \" chunk"
                }
            ));
        }
        let len = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as u64;
        pos += 8;
        match &ch[..4] {
            b"fmt " => {
                let mut fmt = [0u8; 40];
                let want = len.min(40) as usize;
                if read_up_to(&mut f, &mut fmt[..want]) < want {
                    return Some(format!(
                        "truncated header: the \"fmt \" chunk claims {len} bytes but the file \
                         ends at byte {file_len}"
                    ));
                }
                if len < 16 {
                    return Some(format!("invalid \"fmt \" chunk of {len} bytes (needs 16)"));
                }
                if let Some(why) = diagnose_fmt(&fmt[..want]) {
                    return Some(why);
                }
                have_fmt = true;
            }
            b"data" => {
                return if have_fmt {
                    None
                } else {
                    Some("invalid WAV: \"data\" chunk before any \"fmt \" chunk".to_string())
                };
            }
            _ => {}
        }
        pos += len;
        if pos > file_len {
            return Some(format!(
                "truncated header: a chunk runs past the end of the file (byte {file_len}) \
                 before the \"data\" chunk"
            ));
        }
        f.seek(SeekFrom::Start(pos)).ok()?;
    }
}

/// Names the encoding problems hound reports only as "unsupported" or a terse format error.
fn diagnose_fmt(fmt: &[u8]) -> Option<String> {
    let u16_at = |i: usize| u16::from_le_bytes([fmt[i], fmt[i + 1]]);
    let mut tag = u16_at(0);
    let channels = u16_at(2);
    let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
    let bits = u16_at(14);
    if channels == 0 {
        return Some("0 channels".to_string());
    }
    if rate == 0 {
        return Some("sample rate is 0 Hz".to_string());
    }
    if tag == 0xFFFE && fmt.len() >= 40 {
        // WAVE_FORMAT_EXTENSIBLE: the real format tag leads the sub-format GUID.
        tag = u16_at(24);
    }
    let unsupported = |what: &str| {
        Some(format!(
            "unsupported encoding: {what} (format tag {tag:#06x}); only 8/16/24/32-bit integer \
             PCM and 32-bit float are supported"
        ))
    };
    match tag {
        1 if !matches!(bits, 8 | 16 | 24 | 32) => unsupported(&format!("{bits}-bit integer PCM")),
        3 if bits != 32 => unsupported(&format!("{bits}-bit float")),
        1 | 3 => None,
        2 => unsupported("Microsoft ADPCM"),
        6 => unsupported("A-law"),
        7 => unsupported("mu-law"),
        0x11 => unsupported("IMA ADPCM"),
        0x31 => unsupported("GSM 6.10"),
        0x50 | 0x55 => unsupported("MPEG audio"),
        0xFFFE => unsupported("WAVE_FORMAT_EXTENSIBLE with a short header"),
        _ => unsupported("unknown compressed format"),
    }
}

/// hound 3.5 reports the end of the file inside the data chunk as an `Other` error with this text.
fn is_eof(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::UnexpectedEof
        || (e.kind() == std::io::ErrorKind::Other && e.to_string() == "Failed to read enough bytes.")
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

fn show_bytes(b: &[u8]) -> String {
    if b.is_empty() {
        return "nothing".to_string();
    }
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("bytes {} ({:?})", hex.join(" "), String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty folder per test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("wgpu-mlkd-wav-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, file: &str) -> PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec(channels: u16, rate: u32, bits: u16, float: bool) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        }
    }

    fn write_ints(path: &Path, spec: hound::WavSpec, values: &[i32]) {
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &v in values {
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
    }

    /// A canonical 44-byte-header WAV built by hand, for headers hound will not write.
    fn raw_wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let block = channels * (bits / 8);
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * block as u32).to_le_bytes());
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&bits.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn integer_depths_decode_exactly() {
        let dir = TempDir::new("ints");
        for bits in [8u16, 16, 24, 32] {
            let max = (1i64 << (bits - 1)) - 1;
            let min = -(1i64 << (bits - 1));
            let values: Vec<i32> = [min, min + 1, -1000, -1, 0, 1, 7, 1000, max - 1, max]
                .iter()
                .map(|&v| v.clamp(min, max) as i32)
                .chain((-128..128).map(|v| v * ((max + 1) / 128) as i32 + 3 * (v & 1)))
                .map(|v| (v as i64).clamp(min, max) as i32)
                .collect();
            let path = dir.path(&format!("int{bits}.wav"));
            write_ints(&path, spec(1, 22050, bits, false), &values);
            let a = read_wav(&path).unwrap();
            assert_eq!(a.sample_rate, 22050);
            let want: Vec<f32> = values
                .iter()
                .map(|&v| (v as f64 / (1u64 << (bits - 1)) as f64) as f32)
                .collect();
            assert_eq!(a.samples, want, "{bits}-bit");
            assert_eq!(a.samples[0], -1.0, "{bits}-bit minimum");
        }
    }

    #[test]
    fn eight_bit_is_unsigned_on_disk() {
        // Raw bytes 0, 1, 128, 255 must read as (b - 128) / 128.
        let dir = TempDir::new("u8");
        let path = dir.path("u8.wav");
        std::fs::write(&path, raw_wav(1, 1, 8000, 8, &[0, 1, 128, 255])).unwrap();
        let a = read_wav(&path).unwrap();
        assert_eq!(a.samples, vec![-1.0, -127.0 / 128.0, 0.0, 127.0 / 128.0]);
    }

    #[test]
    fn float_and_multichannel_downmix() {
        let dir = TempDir::new("float");
        let vals = [0.5f32, -0.25, 1e-8, 3.0, -1.0, 0.1];
        let path = dir.path("mono.wav");
        let mut w = hound::WavWriter::create(&path, spec(1, 22050, 32, true)).unwrap();
        vals.iter().for_each(|&v| w.write_sample(v).unwrap());
        w.finalize().unwrap();
        assert_eq!(read_wav(&path).unwrap().samples, vals);

        for ch in [2u16, 3] {
            let path = dir.path(&format!("float{ch}.wav"));
            let mut w = hound::WavWriter::create(&path, spec(ch, 22050, 32, true)).unwrap();
            vals.iter().for_each(|&v| w.write_sample(v).unwrap());
            w.finalize().unwrap();
            let want: Vec<f32> = vals
                .chunks(ch as usize)
                .map(|f| (f.iter().map(|&v| v as f64).sum::<f64>() / ch as f64) as f32)
                .collect();
            let a = read_wav(&path).unwrap();
            assert_eq!((a.samples, a.sample_rate), (want, 22050), "{ch} channels");

            // 16-bit integers, same layout.
            let ints = [1000, -3, 32767, -32768, 5, 6];
            let path = dir.path(&format!("int{ch}.wav"));
            write_ints(&path, spec(ch, 22050, 16, false), &ints);
            let want: Vec<f32> = ints
                .chunks(ch as usize)
                .map(|f| (f.iter().map(|&v| v as f64 / 32768.0).sum::<f64>() / ch as f64) as f32)
                .collect();
            assert_eq!(read_wav(&path).unwrap().samples, want, "{ch}-channel int16");
        }
    }

    #[test]
    fn writers_round_trip() {
        let dir = TempDir::new("write");
        let x = vec![0.0f32, 0.5, -0.5, 0.999, -1.0, 1e-3];
        let p = dir.path("f.wav");
        write_wav_f32(&p, &x, 16000).unwrap();
        assert_eq!(
            read_wav(&p).unwrap(),
            Audio {
                samples: x.clone(),
                sample_rate: 16000
            }
        );
        let p = dir.path("i.wav");
        write_wav_i16(&p, &x, 8000).unwrap();
        let a = read_wav(&p).unwrap();
        assert_eq!(a.sample_rate, 8000);
        for (got, want) in a.samples.iter().zip(&x) {
            assert!((got - want).abs() <= 0.5 / 32768.0, "{got} vs {want}");
        }
        // Only the final file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(write_wav_f32(&dir.path("nan.wav"), &[f32::NAN], 16000).is_err());
        assert!(write_wav_f32(&dir.path("zero.wav"), &[0.0], 0).is_err());
    }

    #[test]
    fn load_16k_resamples_or_passes_through() {
        let dir = TempDir::new("load");
        let x: Vec<f32> = (0..1600).map(|i| (i as f32 * 0.01).sin() * 0.5).collect();
        let p = dir.path("16k.wav");
        write_wav_f32(&p, &x, 16000).unwrap();
        assert_eq!(load_16k(&p).unwrap(), x);
        let p = dir.path("8k.wav");
        write_wav_f32(&p, &x, 8000).unwrap();
        let y = load_16k(&p).unwrap();
        assert_eq!(y, crate::data::resample::resample(&x, 8000, 16000));
        assert_eq!(y.len(), 3200);
    }

    /// Interleaved test values for `bits`-bit integers (the extremes included) or floats.
    fn values(n: usize, bits: u16, float: bool) -> Vec<f64> {
        let mut seed = 7u32 + bits as u32;
        (0..n)
            .map(|k| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (seed >> 8) as f64 / (1u32 << 24) as f64; // [0, 1)
                let v = 0.6 * (k as f64 * 0.05).sin() + 0.4 * (2.0 * u - 1.0);
                match (k % 97, float) {
                    (0, false) => -1.0,
                    (1, false) => 1.0 - 1.0 / (1u64 << (bits - 1)) as f64,
                    _ => v,
                }
            })
            .collect()
    }

    /// Writes `frames` frames of `channels` channels in the given encoding.
    fn write_encoded(path: &Path, channels: u16, rate: u32, bits: u16, float: bool, frames: usize) {
        let mut w = hound::WavWriter::create(path, spec(channels, rate, bits, float)).unwrap();
        for v in values(frames * channels as usize, bits, float) {
            if float {
                w.write_sample(v as f32).unwrap();
            } else {
                let scale = (1u64 << (bits - 1)) as f64;
                let q = (v * scale).round().clamp(-scale, scale - 1.0) as i32;
                w.write_sample(q).unwrap();
            }
        }
        w.finalize().unwrap();
    }

    fn bits_of(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Reads the whole stream in pieces of `sizes` (cycled).
    fn read_stream(path: &Path, sizes: &[usize]) -> Vec<f32> {
        let mut s = open_16k(path).unwrap();
        let want_len = s.len();
        let mut out = Vec::new();
        for k in 0.. {
            let n = sizes[k % sizes.len()];
            let before = out.len();
            let got = s.read(&mut out, n).unwrap();
            assert_eq!(got, out.len() - before);
            assert_eq!(s.position(), out.len());
            if got < n {
                // Fewer than asked only at the end, and then nothing more.
                assert_eq!(s.read(&mut out, n).unwrap(), 0);
                break;
            }
        }
        assert_eq!(out.len(), want_len, "len() promised {want_len}");
        out
    }

    #[test]
    fn streams_are_bit_identical_to_whole_file_reading() {
        let dir = TempDir::new("stream");
        let encodings = [(8u16, false), (16, false), (24, false), (32, false), (32, true)];
        let mut cases = Vec::new();
        for &(bits, float) in &encodings {
            for channels in [1u16, 2, 8] {
                for rate in [16000u32, 44100, 48000, 8000, 22050] {
                    cases.push((bits, float, channels, rate, rate as usize / 20 + 3));
                }
            }
        }
        // 10 MHz: 30 ms, mono and stereo.
        cases.push((16, false, 1, 10_000_000, 300_001));
        cases.push((32, true, 2, 10_000_000, 100_000));
        // An odd rate (interpolated resampling table), three channels.
        cases.push((24, false, 3, 44101, 2000));
        for (bits, float, channels, rate, frames) in cases {
            let what = format!(
                "{bits}-bit {} x{channels} @ {rate}",
                if float { "float" } else { "int" }
            );
            let path = dir.path("x.wav");
            write_encoded(&path, channels, rate, bits, float, frames);
            // The native-rate stream, in pieces, is read_wav.
            let whole = read_wav(&path).unwrap();
            assert_eq!(whole.samples.len(), frames, "{what}");
            for sizes in [&[1usize][..], &[7, 4097, 2]] {
                let mut st = WavStream::open(&path).unwrap();
                assert_eq!(
                    (st.frames(), st.channels(), st.sample_rate()),
                    (frames, channels as usize, rate)
                );
                let mut got = Vec::new();
                let mut k = 0;
                while st.read_frames(&mut got, sizes[k % sizes.len()]).unwrap() > 0 {
                    k += 1;
                    if frames > 100_000 && k > 1000 {
                        // Enough single frames; the rest in one go.
                        while st.read_frames(&mut got, usize::MAX).unwrap() > 0 {}
                        break;
                    }
                }
                assert_eq!(bits_of(&got), bits_of(&whole.samples), "{what} native in {sizes:?}");
            }
            // The 16 kHz stream, in pieces, is load_16k.
            let want = bits_of(&load_16k(&path).unwrap());
            for sizes in [&[1usize][..], &[3, 1000, 17, 65537], &[usize::MAX]] {
                if frames > 100_000 && sizes[0] == 1 {
                    continue;
                }
                assert_eq!(
                    bits_of(&read_stream(&path, sizes)),
                    want,
                    "{what} at 16 kHz in {sizes:?}"
                );
            }
        }
    }

    #[test]
    fn a_partial_trailing_frame_is_refused() {
        // Stereo 16-bit with 5 samples: hound refuses a data chunk that is not whole frames, so every frame
        // the stream counts is whole.
        let dir = TempDir::new("partial");
        let path = dir.path("p.wav");
        std::fs::write(&path, raw_wav(1, 2, 8000, 16, &[0, 4, 0, 8, 0, 12, 0, 16, 0, 20])).unwrap();
        let err = format!("{:#}", WavStream::open(&path).err().unwrap());
        assert!(err.contains("p.wav") && err.contains("data chunk length"), "{err}");
    }

    #[test]
    fn a_truncated_stream_fails_where_the_data_ends() {
        let dir = TempDir::new("stream-cut");
        for rate in [16000u32, 44100] {
            let path = dir.path("cut.wav");
            write_encoded(&path, 2, rate, 16, false, 10_000);
            // Keep 5000.5 of the 20000 samples: the header still promises all of them.
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..44 + 2 * 5000 + 1]).unwrap();
            let mut s = open_16k(&path).unwrap();
            assert_eq!(s.len(), output_len(10_000, rate, TARGET_RATE));
            let mut out = Vec::new();
            let err = loop {
                match s.read(&mut out, 300) {
                    Ok(n) => assert_eq!(n, 300, "a short read before the error"),
                    Err(e) => break format!("{e:#}"),
                }
            };
            eprintln!("{rate} Hz: {err} after {} samples", out.len());
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                err.contains("truncated: header says 20000 samples (10000 frames x 2 channels), file holds 5000"),
                "{err}"
            );
            // Everything before the cut (2500 frames) came through first, give or take the filter's reach.
            assert!(
                out.len() >= output_len(2500, rate, TARGET_RATE) - 300 - 200,
                "{}",
                out.len()
            );
            // The error repeats; the stream does not carry on past it.
            let held = out.len();
            assert!(format!("{:#}", s.read(&mut out, 1 << 20).unwrap_err()).contains("file holds 5000"));
            assert_eq!(out.len(), held, "a failed read leaves `out` alone");
            assert!(format!("{:#}", read_wav(&path).unwrap_err()).contains("file holds 5000"));
        }
    }

    #[test]
    fn normalize_matches_numpy_formula() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 10.0];
        let mean = 4.0f64;
        let var = (9.0 + 4.0 + 1.0 + 0.0 + 36.0) / 5.0;
        let want: Vec<f32> = [1.0f64, 2.0, 3.0, 4.0, 10.0]
            .iter()
            .map(|v| ((v - mean) / (var + 1e-7f64).sqrt()) as f32)
            .collect();
        normalize(&mut x);
        assert_eq!(x, want);
        // Constant input: the 1e-7 keeps it finite (all zeros).
        let mut c = vec![0.25f32; 7];
        normalize(&mut c);
        assert!(c.iter().all(|&v| v == 0.0));
        let mut e: Vec<f32> = vec![];
        normalize(&mut e);
    }

    /// Reads `bytes` from a file and returns the error text, which must name the file and `needle`.
    #[track_caller]
    fn expect_error(dir: &TempDir, name: &str, bytes: &[u8], needle: &str) {
        let p = dir.path(name);
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", read_wav(&p).unwrap_err());
        eprintln!("{name}: {err}");
        assert!(err.contains(&p.display().to_string()), "no path in: {err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = TempDir::new("bad");
        let missing = dir.path("missing.wav");
        let err = format!("{:#}", read_wav(&missing).unwrap_err());
        assert!(
            err.contains(&missing.display().to_string()) && err.contains("cannot open"),
            "{err}"
        );

        expect_error(&dir, "empty.wav", b"", "empty file");
        expect_error(&dir, "text.wav", b"hello, this is not audio at all", "not a WAV file");
        expect_error(&dir, "avi.wav", b"RIFF\x04\0\0\0AVI LIST", "form type");
        let good = raw_wav(1, 1, 16000, 16, &[1, 0, 2, 0, 3, 0, 4, 0]);
        expect_error(&dir, "head8.wav", &good[..8], "truncated header");
        expect_error(&dir, "head30.wav", &good[..30], "truncated header");
        expect_error(&dir, "head40.wav", &good[..40], "truncated header");
        expect_error(&dir, "alaw.wav", &raw_wav(6, 1, 8000, 8, &[1, 2]), "A-law");
        expect_error(&dir, "mulaw.wav", &raw_wav(7, 1, 8000, 8, &[1, 2]), "mu-law");
        expect_error(&dir, "f64.wav", &raw_wav(3, 1, 8000, 64, &[0; 16]), "64-bit float");
        expect_error(&dir, "adpcm.wav", &raw_wav(2, 1, 8000, 8, &[0; 4]), "ADPCM");
        expect_error(&dir, "12bit.wav", &raw_wav(1, 1, 8000, 12, &[0; 4]), "12-bit");
        expect_error(&dir, "rate0.wav", &raw_wav(1, 1, 0, 16, &[0; 4]), "0 Hz");
        expect_error(&dir, "ch0.wav", &raw_wav(1, 0, 8000, 16, &[0; 4]), "0 channels");
        expect_error(&dir, "nodata.wav", &raw_wav(1, 1, 8000, 16, &[]), "no audio samples");

        // Data chunk claims 4 samples, only 2.5 are there.
        let short = raw_wav(1, 1, 16000, 16, &[1, 0, 2, 0, 3, 0, 4, 0]);
        expect_error(
            &dir,
            "short.wav",
            &short[..short.len() - 3],
            "truncated: header says 4 samples (4 frames x 1 channels), file holds 2",
        );

        // A NaN in the middle of a stereo float file: sample 3 = frame 1, channel 1.
        let mut data = Vec::new();
        for v in [0.1f32, 0.2, 0.3, f32::NAN, 0.5, 0.6] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        expect_error(
            &dir,
            "nan.wav",
            &raw_wav(3, 2, 16000, 32, &data),
            "sample 3 (frame 1, channel 1) is NaN",
        );
        let mut data = Vec::new();
        for v in [0.1f32, f32::INFINITY] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        expect_error(
            &dir,
            "inf.wav",
            &raw_wav(3, 1, 16000, 32, &data),
            "sample 1 (frame 1, channel 0) is inf",
        );
    }
}
