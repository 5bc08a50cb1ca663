//! The teacher cache: the clean-speech targets of distillation (`hidden_states[l]` of the frozen teacher for
//! the target layers), computed once by `wgpu-mlkd cache-teacher` and read at random by the training code.
//!
//! # Layout of a cache directory
//! - `manifest.json` ([`Manifest`]): format and version; the teacher (SHA-256 of its `config.json` and of its
//!   weight files, size, whether its input is normalised); the layers; the stored dtype; the sample rate
//!   (16000); the `--shard K/N` subset if any; every shard (file, SHA-256, bytes); and per utterance its id,
//!   the SHA-256 of its audio file, its length in 16 kHz samples, its frame count, its shard and the byte
//!   offset of its data in that shard. Rewritten atomically after every shard.
//! - `shard-NNNNN.safetensors`: plain safetensors files, one tensor per utterance and layer, named
//!   `{id}/hidden_states.{l}`, shape `[frames, hidden]`, dtype F16 or F32, stored utterance after utterance
//!   (an utterance's layers are contiguous, in manifest layer order), so any safetensors reader can open
//!   them. Each shard is written to a temporary file, synced, then renamed: a shard is whole or absent.
//!
//! The reader ([`TeacherCache`]) memory-maps the shards: opening reads only headers, and an utterance's
//! targets are read (and converted to f32) on demand, so memory does not grow with the cache.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Wav2Vec2Config;

/// `manifest.json`'s `format` field.
pub const FORMAT: &str = "wgpu-mlkd-teacher-cache";
/// Bumped on any incompatible change of the layout.
pub const VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// The metadata `format` of a shard file.
pub const SHARD_FORMAT: &str = "wgpu-mlkd-teacher-cache-shard";
/// Cached audio is always at wav2vec 2.0's rate.
pub const SAMPLE_RATE: u32 = 16000;

pub use crate::model::student::default_target_layers;

/// The dtype targets are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDType {
    F16,
    F32,
}

impl CacheDType {
    pub fn size(self) -> usize {
        match self {
            CacheDType::F16 => 2,
            CacheDType::F32 => 4,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            CacheDType::F16 => safetensors::Dtype::F16,
            CacheDType::F32 => safetensors::Dtype::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            CacheDType::F16 => "f16",
            CacheDType::F32 => "f32",
        }
    }
}

impl std::fmt::Display for CacheDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheDType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(CacheDType::F16),
            "f32" => Ok(CacheDType::F32),
            _ => bail!("dtype {s:?}: expected f16 or f32"),
        }
    }
}

/// What identifies the teacher a cache was computed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// SHA-256 of `config.json`'s bytes.
    pub config_sha256: String,
    /// SHA-256 of the weight files' bytes, concatenated in name order (`model.safetensors`, or the files a
    /// sharded index lists).
    pub weights_sha256: String,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    /// Samples one frame sees, and samples per frame.
    pub receptive_field: usize,
    pub total_stride: usize,
    /// Whether the waveform was normalised to zero mean, unit variance before the forward.
    pub normalize: bool,
    /// Whether the teacher ran with its linear weights in f16 (`cache-teacher --f16-weights`; absent in
    /// caches written before the option: f32).
    #[serde(default)]
    pub f16_weights: bool,
}

impl TeacherInfo {
    /// Hashes the teacher folder's config and weights (reads the weights once: about a second for base).
    pub fn from_dir(dir: &Path, normalize: bool) -> Result<(TeacherInfo, Wav2Vec2Config)> {
        let config_path = dir.join("config.json");
        let config_bytes =
            std::fs::read(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
        let config = Wav2Vec2Config::from_file(&config_path)?;
        let mut hasher = Sha256::new();
        for file in weight_files(dir)? {
            let mut f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            std::io::copy(&mut f, &mut hasher).with_context(|| format!("cannot read {}", file.display()))?;
        }
        let info = TeacherInfo {
            config_sha256: hex(&Sha256::digest(&config_bytes)),
            weights_sha256: hex(&hasher.finalize()),
            num_hidden_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
            receptive_field: config.receptive_field(),
            total_stride: config.total_stride(),
            normalize,
            f16_weights: false,
        };
        Ok((info, config))
    }
}

/// The weight files the checkpoint loader reads, in name order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!(
            "{} has no model.safetensors (nor model.safetensors.index.json)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no weight_map object", index.display()))?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// `--shard K/N`: the utterances whose index (in id order) is K modulo N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    pub index: usize,
    pub count: usize,
}

impl Subset {
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index
    }
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Subset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard {s:?}: expected K/N, e.g. 0/4"))?;
        let index: usize = k
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard {s:?}: K is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard {s:?}: N is not a number"))?;
        if count == 0 || index >= count {
            bail!("--shard {s:?}: need 0 <= K < N");
        }
        Ok(Subset { index, count })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The number in the file name.
    pub index: usize,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub utterances: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UtteranceEntry {
    pub id: String,
    /// SHA-256 of the audio file's bytes.
    pub audio_sha256: String,
    /// Length at 16 kHz (after resampling).
    pub samples: u64,
    pub frames: usize,
    /// The shard's `index`.
    pub shard: usize,
    /// Byte offset, from the start of the shard file, of this utterance's data (its layers, contiguous).
    pub offset: u64,
}

/// A file left out under `--skip-bad`, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEntry {
    pub id: String,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub teacher: TeacherInfo,
    pub layers: Vec<usize>,
    pub dtype: CacheDType,
    pub sample_rate: u32,
    pub subset: Option<Subset>,
    pub shards: Vec<ShardEntry>,
    pub utterances: Vec<UtteranceEntry>,
    #[serde(default)]
    pub skipped: Vec<SkippedEntry>,
}

impl Manifest {
    pub fn new(teacher: TeacherInfo, layers: Vec<usize>, dtype: CacheDType, subset: Option<Subset>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            teacher,
            layers,
            dtype,
            sample_rate: SAMPLE_RATE,
            subset,
            shards: Vec::new(),
            utterances: Vec::new(),
            skipped: Vec::new(),
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.teacher.hidden_size
    }

    /// Stored bytes of one frame (all layers).
    pub fn bytes_per_frame(&self) -> usize {
        self.layers.len() * self.hidden_size() * self.dtype.size()
    }

    /// Reads `dir/manifest.json`, checking format and version.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid JSON", path.display()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            bail!("{}: not a wgpu-mlkd teacher cache manifest", path.display());
        }
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if version != VERSION as u64 {
            bail!(
                "{}: cache format version {version}, this build reads version {VERSION}; rebuild the cache \
                 (cache-teacher --force)",
                path.display()
            );
        }
        let m: Manifest =
            serde_json::from_value(v).with_context(|| format!("{}: malformed manifest", path.display()))?;
        m.check_consistent()
            .with_context(|| format!("{}: inconsistent manifest", path.display()))?;
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically: indented JSON with one line per shard, utterance and skipped
    /// file (it is rewritten after every shard, so it stays compact for corpora of many utterances).
    pub fn write(&self, dir: &Path) -> Result<()> {
        fn lines<T: Serialize>(items: &[T]) -> Result<String> {
            if items.is_empty() {
                return Ok("[]".into());
            }
            let rows = items.iter().map(serde_json::to_string).collect::<Result<Vec<_>, _>>()?;
            Ok(format!("[\n    {}\n  ]", rows.join(",\n    ")))
        }
        let head = Manifest {
            shards: Vec::new(),
            utterances: Vec::new(),
            skipped: Vec::new(),
            ..self.clone()
        };
        let mut text = serde_json::to_string_pretty(&head)?;
        for (key, list) in [
            ("shards", lines(&self.shards)?),
            ("utterances", lines(&self.utterances)?),
            ("skipped", lines(&self.skipped)?),
        ] {
            let empty = format!("\"{key}\": []");
            debug_assert_eq!(text.matches(&empty).count(), 1);
            text = text.replacen(&empty, &format!("\"{key}\": {list}"), 1);
        }
        text.push('\n');
        crate::fsutil::atomic_write(&dir.join(MANIFEST), text.as_bytes())?;
        sync_dir(dir)
    }

    /// Internal consistency: ids unique, every utterance in a listed shard, counts agree.
    pub fn check_consistent(&self) -> Result<()> {
        if self.sample_rate != SAMPLE_RATE {
            bail!("sample rate {} (expected {SAMPLE_RATE})", self.sample_rate);
        }
        if self.layers.is_empty() || self.layers.iter().any(|&l| l > self.teacher.num_hidden_layers) {
            bail!(
                "layers {:?} do not fit a teacher of {} layers",
                self.layers,
                self.teacher.num_hidden_layers
            );
        }
        let mut ids = BTreeSet::new();
        let mut per_shard: HashMap<usize, usize> = HashMap::new();
        for u in &self.utterances {
            if !ids.insert(u.id.as_str()) {
                bail!("utterance {} listed twice", u.id);
            }
            *per_shard.entry(u.shard).or_default() += 1;
        }
        let mut files = BTreeSet::new();
        for s in &self.shards {
            if s.file != shard_file_name(s.index) || !files.insert(s.index) {
                bail!("shard entry {} (index {}) is malformed or repeated", s.file, s.index);
            }
            let n = per_shard.remove(&s.index).unwrap_or(0);
            if n != s.utterances {
                bail!("{} lists {} utterances, {n} point to it", s.file, s.utterances);
            }
        }
        if let Some((shard, _)) = per_shard.into_iter().next() {
            bail!("utterances point to shard {shard}, which is not listed");
        }
        Ok(())
    }

    /// Differences in what makes two caches' targets comparable (teacher, layers, dtype, rate), one per line;
    /// empty when compatible.
    pub fn incompatibilities(&self, other: &Manifest) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (&self.teacher, &other.teacher);
        if a.config_sha256 != b.config_sha256 {
            out.push(format!(
                "teacher config.json SHA-256 {} vs {}",
                a.config_sha256, b.config_sha256
            ));
        }
        if a.weights_sha256 != b.weights_sha256 {
            out.push(format!(
                "teacher weights SHA-256 {} vs {}",
                a.weights_sha256, b.weights_sha256
            ));
        }
        if a.normalize != b.normalize {
            out.push(format!("input normalisation {} vs {}", a.normalize, b.normalize));
        }
        if a.f16_weights != b.f16_weights {
            let show = |f16: bool| if f16 { "f16" } else { "f32" };
            out.push(format!(
                "teacher linear weights {} vs {} (--f16-weights)",
                show(a.f16_weights),
                show(b.f16_weights)
            ));
        }
        if a != b && out.is_empty() {
            out.push("teacher description differs".into());
        }
        if self.layers != other.layers {
            out.push(format!("layers {:?} vs {:?}", self.layers, other.layers));
        }
        if self.dtype != other.dtype {
            out.push(format!("dtype {} vs {}", self.dtype, other.dtype));
        }
        if self.sample_rate != other.sample_rate {
            out.push(format!("sample rate {} vs {}", self.sample_rate, other.sample_rate));
        }
        out
    }
}

pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

/// Whether `name` is a file this module writes in a cache directory (manifest, shard, or a temporary file).
pub fn is_cache_file(name: &str) -> bool {
    name == MANIFEST || is_shard_file(name) || is_temp_file(name)
}

fn is_shard_file(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp") && (name.contains("shard-") || name.contains(MANIFEST))
}

/// Removes temporary files and shard files the manifest does not list (left by a crash between writing a
/// shard and the manifest). Returns how many were removed.
pub fn remove_leftovers(dir: &Path, manifest: &Manifest) -> Result<usize> {
    let listed: BTreeSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_temp_file(&name) || (is_shard_file(&name) && !listed.contains(name.as_str())) {
            std::fs::remove_file(dir.join(&name)).with_context(|| format!("cannot remove {name}"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hex(&h.finalize()))
}

/// Makes a rename in `dir` durable (on Unix; a no-op elsewhere).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// One utterance of a shard being written.
#[derive(Clone, Debug)]
pub struct PlannedUtterance {
    pub id: String,
    pub frames: usize,
}

/// Writes one shard file sequentially: the header is computed from the plan, then values are appended in
/// plan order (utterance by utterance, layer by layer, `[frames, hidden]` row-major), converted to the stored
/// dtype and hashed on the way. [`ShardWriter::finish`] syncs and renames it into place; dropping an
/// unfinished writer removes its temporary file.
pub struct ShardWriter {
    file: Option<std::io::BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    index: usize,
    dtype: CacheDType,
    hasher: Sha256,
    written: u64,
    total: u64,
    /// Absolute byte offset of each planned utterance's data.
    offsets: Vec<u64>,
    /// Values expected per utterance and their running position, to name an utterance in errors.
    plan: Vec<PlannedUtterance>,
    values_per_frame: usize,
    cursor: (usize, usize),
}

impl ShardWriter {
    pub fn create(
        dir: &Path,
        index: usize,
        dtype: CacheDType,
        layers: &[usize],
        hidden: usize,
        plan: &[PlannedUtterance],
    ) -> Result<ShardWriter> {
        if plan.is_empty() {
            bail!("a shard needs at least one utterance");
        }
        let es = dtype.size();
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({
                "format": SHARD_FORMAT,
                "version": VERSION.to_string(),
                "layers": layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
            }),
        );
        let mut data_offsets = Vec::with_capacity(plan.len());
        let mut at = 0usize;
        for u in plan {
            data_offsets.push(at);
            for &l in layers {
                let n = u.frames * hidden * es;
                header.insert(
                    format!("{}/hidden_states.{l}", u.id),
                    serde_json::json!({
                        "dtype": dtype.safetensors(),
                        "shape": [u.frames, hidden],
                        "data_offsets": [at, at + n],
                    }),
                );
                at += n;
            }
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
        // safetensors pads the header with spaces so that data starts 8-byte aligned.
        header.resize((8 + header.len()).div_ceil(8) * 8 - 8, b' ');
        let data_start = 8 + header.len() as u64;
        let path = dir.join(shard_file_name(index));
        let tmp = dir.join(format!(".{}.{}.tmp", shard_file_name(index), std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = ShardWriter {
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            tmp,
            path,
            index,
            dtype,
            hasher: Sha256::new(),
            written: 0,
            total: data_start + at as u64,
            offsets: data_offsets.iter().map(|&o| data_start + o as u64).collect(),
            plan: plan.to_vec(),
            values_per_frame: layers.len() * hidden,
            cursor: (0, 0),
        };
        w.put(&(header.len() as u64).to_le_bytes())?;
        w.put(&header)?;
        Ok(w)
    }

    /// Absolute byte offsets of the planned utterances' data.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", self.tmp.display()))
    }

    /// Appends the next values in plan order. Non-finite values, and values beyond f16's range when storing
    /// f16, are errors naming the utterance.
    pub fn write_values(&mut self, values: &[f32]) -> Result<()> {
        let mut rest = values;
        while !rest.is_empty() {
            let (u, done) = self.cursor;
            let Some(p) = self.plan.get(u) else {
                bail!("{}: more values than planned", self.path.display());
            };
            let left = p.frames * self.values_per_frame - done;
            let (now, later) = rest.split_at(left.min(rest.len()));
            let mut bytes = Vec::with_capacity(now.len() * self.dtype.size());
            for (j, &v) in now.iter().enumerate() {
                let bad = |what: &str| anyhow!("{}: teacher output value {v} at element {} is {what}", p.id, done + j);
                if !v.is_finite() {
                    return Err(bad("not finite: the teacher or its input is broken"));
                }
                match self.dtype {
                    CacheDType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                    CacheDType::F16 => {
                        let h = half::f16::from_f32(v);
                        if h.is_infinite() {
                            return Err(bad("beyond the f16 range (65504); use --dtype f32"));
                        }
                        bytes.extend_from_slice(&h.to_le_bytes());
                    }
                }
            }
            self.cursor = if now.len() == left {
                (u + 1, 0)
            } else {
                (u, done + now.len())
            };
            self.put(&bytes)?;
            rest = later;
        }
        Ok(())
    }

    /// Syncs the file, renames it into place and syncs the directory.
    pub fn finish(mut self) -> Result<ShardEntry> {
        if self.written != self.total {
            bail!(
                "{}: {} bytes written, {} planned",
                self.path.display(),
                self.written,
                self.total
            );
        }
        let file = self.file.take().expect("open until finish");
        let file = file
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", self.tmp.display(), e.error()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", self.tmp.display()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot rename {} into place", self.tmp.display()))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        sync_dir(dir)?;
        Ok(ShardEntry {
            index: self.index,
            file: shard_file_name(self.index),
            sha256: hex(&std::mem::take(&mut self.hasher).finalize()),
            bytes: self.total,
            utterances: self.plan.len(),
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A memory-mapped shard file.
struct MappedShard {
    map: memmap2::Mmap,
}

/// Where one utterance's targets lie.
struct Location {
    shard: usize,
    /// Absolute byte range per layer (manifest layer order).
    layers: Vec<Range<usize>>,
    frames: usize,
}

/// Random access to a cache by utterance id. Opening maps the shards and reads their headers only; targets
/// are read and converted on demand. `Send + Sync`: share it between loader threads.
pub struct TeacherCache {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<MappedShard>,
    by_id: HashMap<String, usize>,
    locations: Vec<Location>,
}

/// What [`TeacherCache::verify`] checked.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub shards: usize,
    pub utterances: usize,
    pub bytes: u64,
    /// Shard or temporary files in the directory that the manifest does not list (harmless leftovers of an
    /// interrupted run; `cache-teacher` removes them when it resumes).
    pub unlisted_files: Vec<String>,
}

impl TeacherCache {
    /// Opens a cache directory: reads the manifest, maps every shard and checks each shard's header against
    /// the manifest (names, shapes, dtype, offsets). Does not read the targets themselves.
    pub fn open(dir: &Path) -> Result<TeacherCache> {
        let manifest = Manifest::read(dir)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut shard_pos = HashMap::new();
        for (i, s) in manifest.shards.iter().enumerate() {
            let path = dir.join(&s.file);
            let file = File::open(&path).with_context(|| format!("cache shard {}: cannot open", path.display()))?;
            let len = file.metadata()?.len();
            if len != s.bytes {
                bail!(
                    "cache shard {} is {len} bytes, the manifest says {}: the cache is corrupted; rebuild it \
                     (cache-teacher --force)",
                    path.display(),
                    s.bytes
                );
            }
            // SAFETY: the cache is written once through rename and not modified in place; a file truncated
            // behind our back would fault, as for any memory-mapped reader (safetensors, numpy.memmap).
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            shards.push(MappedShard { map });
            shard_pos.insert(s.index, i);
        }
        let d = manifest.hidden_size();
        let es = manifest.dtype.size();
        let mut by_id = HashMap::with_capacity(manifest.utterances.len());
        let mut locations = Vec::with_capacity(manifest.utterances.len());
        let mut headers: Vec<Option<safetensors::tensor::Metadata>> = vec![None; shards.len()];
        for (i, u) in manifest.utterances.iter().enumerate() {
            let si = shard_pos[&u.shard];
            let file = &manifest.shards[si].file;
            if headers[si].is_none() {
                let (_, meta) = safetensors::SafeTensors::read_metadata(&shards[si].map[..])
                    .map_err(|e| anyhow!("cache shard {file}: not a valid safetensors file ({e})"))?;
                headers[si] = Some(meta);
            }
            let (n, meta) = (
                header_len(&shards[si].map[..]),
                headers[si].as_ref().expect("just read"),
            );
            let mut layers = Vec::with_capacity(manifest.layers.len());
            for &l in &manifest.layers {
                let name = format!("{}/hidden_states.{l}", u.id);
                let info = meta
                    .info(&name)
                    .ok_or_else(|| anyhow!("cache shard {file} has no tensor {name} (the manifest lists it)"))?;
                if info.dtype != manifest.dtype.safetensors() || info.shape != [u.frames, d] {
                    bail!(
                        "cache shard {file}: {name} is {:?} {:?}, the manifest says {} [{}, {d}]",
                        info.dtype,
                        info.shape,
                        manifest.dtype,
                        u.frames
                    );
                }
                let start = 8 + n + info.data_offsets.0;
                layers.push(start..start + u.frames * d * es);
            }
            if layers[0].start as u64 != u.offset {
                bail!(
                    "cache shard {file}: {} starts at byte {}, the manifest says {}",
                    u.id,
                    layers[0].start,
                    u.offset
                );
            }
            by_id.insert(u.id.clone(), i);
            locations.push(Location {
                shard: si,
                layers,
                frames: u.frames,
            });
        }
        for (si, meta) in headers.iter().enumerate() {
            let file = &manifest.shards[si].file;
            let expect = manifest.shards[si].utterances * manifest.layers.len();
            let have = match meta {
                Some(m) => m.tensors().len(),
                None => safetensors::SafeTensors::read_metadata(&shards[si].map[..])
                    .map(|(_, m)| m.tensors().len())
                    .unwrap_or(usize::MAX),
            };
            if have != expect {
                bail!("cache shard {file} holds {have} tensors, the manifest accounts for {expect}");
            }
        }
        Ok(TeacherCache {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            by_id,
            locations,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The cached `hidden_states` indices, ascending.
    pub fn layers(&self) -> &[usize] {
        &self.manifest.layers
    }

    pub fn hidden_size(&self) -> usize {
        self.manifest.hidden_size()
    }

    pub fn dtype(&self) -> CacheDType {
        self.manifest.dtype
    }

    pub fn len(&self) -> usize {
        self.manifest.utterances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.utterances.is_empty()
    }

    /// Utterance ids, in the order they were cached (id order within a cache-teacher run; sorted after a merge).
    pub fn utterance_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.manifest.utterances.iter().map(|u| u.id.as_str())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn frames(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).map(|&i| self.locations[i].frames)
    }

    /// Targets of `hidden_states[layer]` for utterance `id`: `[frames, hidden]` row-major, f32.
    pub fn targets(&self, id: &str, layer: usize) -> Result<Vec<f32>> {
        let frames = self
            .frames(id)
            .ok_or_else(|| anyhow!("utterance {id:?} is not in the cache"))?;
        self.targets_range(id, layer, 0..frames)
    }

    /// Frames `range` of [`TeacherCache::targets`] (for crops): `[range.len(), hidden]`, f32.
    pub fn targets_range(&self, id: &str, layer: usize, range: Range<usize>) -> Result<Vec<f32>> {
        let &i = self
            .by_id
            .get(id)
            .ok_or_else(|| anyhow!("utterance {id:?} is not in the cache"))?;
        let j = self
            .manifest
            .layers
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| anyhow!("layer {layer} is not in the cache (cached: {:?})", self.manifest.layers))?;
        let loc = &self.locations[i];
        if range.start > range.end || range.end > loc.frames {
            bail!(
                "frames {range:?} of {id:?} are out of range (it has {} frames)",
                loc.frames
            );
        }
        let row = self.hidden_size() * self.dtype().size();
        let start = loc.layers[j].start + range.start * row;
        let bytes = &self.shards[loc.shard].map[start..start + range.len() * row];
        Ok(decode(bytes, self.dtype()))
    }

    /// Recomputes every shard's SHA-256 against the manifest and checks that every stored value is finite
    /// (the structure was checked by `open`). Reads the whole cache, one shard at a time.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut problems = Vec::new();
        for (s, mapped) in self.manifest.shards.iter().zip(&self.shards) {
            let got = hex(&Sha256::digest(&mapped.map[..]));
            if got != s.sha256 {
                problems.push(format!(
                    "{}: SHA-256 {got} differs from the manifest's {} (corrupted)",
                    s.file, s.sha256
                ));
            }
            report.shards += 1;
            report.bytes += s.bytes;
        }
        for (u, loc) in self.manifest.utterances.iter().zip(&self.locations) {
            for (r, l) in loc.layers.iter().zip(&self.manifest.layers) {
                let bytes = &self.shards[loc.shard].map[r.clone()];
                if let Some(k) = decode(bytes, self.dtype()).iter().position(|v| !v.is_finite()) {
                    problems.push(format!("{}/hidden_states.{l}: element {k} is not finite", u.id));
                }
            }
            report.utterances += 1;
        }
        let listed: BTreeSet<&str> = self.manifest.shards.iter().map(|s| s.file.as_str()).collect();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if (is_shard_file(&name) && !listed.contains(name.as_str())) || is_temp_file(&name) {
                report.unlisted_files.push(name);
            }
        }
        report.unlisted_files.sort();
        if !problems.is_empty() {
            bail!(
                "cache {} failed verification:\n  {}",
                self.dir.display(),
                problems.join("\n  ")
            );
        }
        Ok(report)
    }
}

fn header_len(buf: &[u8]) -> usize {
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize
}

fn decode(bytes: &[u8], dtype: CacheDType) -> Vec<f32> {
    match dtype {
        CacheDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        CacheDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TeacherInfo {
        TeacherInfo {
            config_sha256: "c".repeat(64),
            weights_sha256: "w".repeat(64),
            num_hidden_layers: 3,
            hidden_size: 5,
            receptive_field: 60,
            total_stride: 40,
            normalize: true,
            f16_weights: false,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgpu-mlkd-cache-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn teacher_hashes_cover_single_and_sharded_checkpoints() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let (a, _) = TeacherInfo::from_dir(&fx.join("base_group"), true).unwrap();
        assert_eq!((a.num_hidden_layers, a.receptive_field, a.total_stride), (3, 60, 40));
        assert_eq!(
            a.weights_sha256,
            file_sha256(&fx.join("base_group/model.safetensors")).unwrap()
        );
        // A sharded checkpoint: its files in name order, concatenated.
        let (b, _) = TeacherInfo::from_dir(&fx.join("ctc_f16_sharded"), true).unwrap();
        let mut h = Sha256::new();
        for i in 1..=4 {
            let f = fx.join(format!("ctc_f16_sharded/model-0000{i}-of-00004.safetensors"));
            h.update(std::fs::read(f).unwrap());
        }
        assert_eq!(b.weights_sha256, hex(&h.finalize()));
        assert!(TeacherInfo::from_dir(&fx, true).is_err());
    }

    #[test]
    fn subsets_parse_and_partition() {
        let s: Subset = "1/3".parse().unwrap();
        assert_eq!(s, Subset { index: 1, count: 3 });
        assert_eq!((0..7).filter(|&i| s.contains(i)).collect::<Vec<_>>(), vec![1, 4]);
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(bad.parse::<Subset>().is_err(), "{bad}");
        }
    }

    #[test]
    fn written_shards_read_back_exactly_and_verify() {
        for dtype in [CacheDType::F32, CacheDType::F16] {
            let dir = temp_dir(&format!("rw-{dtype}"));
            let layers = vec![1, 3];
            let plan = vec![
                PlannedUtterance {
                    id: "a".into(),
                    frames: 3,
                },
                PlannedUtterance {
                    id: "b/c\"d".into(),
                    frames: 1,
                },
            ];
            let mut w = ShardWriter::create(&dir, 7, dtype, &layers, 5, &plan).unwrap();
            let offsets = w.offsets().to_vec();
            let values: Vec<f32> = (0..(4 * 2 * 5)).map(|i| i as f32 * 0.25 - 3.0).collect();
            // Written in uneven pieces: the writer tracks utterance boundaries itself.
            w.write_values(&values[..7]).unwrap();
            w.write_values(&values[7..33]).unwrap();
            w.write_values(&values[33..]).unwrap();
            let entry = w.finish().unwrap();
            let mut m = Manifest::new(info(), layers, dtype, None);
            for (i, p) in plan.iter().enumerate() {
                m.utterances.push(UtteranceEntry {
                    id: p.id.clone(),
                    audio_sha256: String::new(),
                    samples: 0,
                    frames: p.frames,
                    shard: 7,
                    offset: offsets[i],
                });
            }
            m.shards.push(entry);
            m.write(&dir).unwrap();
            assert_eq!(Manifest::read(&dir).unwrap(), m);
            // An ordinary safetensors reader sees the tensors.
            let bytes = std::fs::read(dir.join(shard_file_name(7))).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor("a/hidden_states.3").unwrap().shape(), &[3, 5]);
            let c = TeacherCache::open(&dir).unwrap();
            assert_eq!(c.frames("a"), Some(3));
            assert_eq!(c.targets("a", 1).unwrap(), values[..15]);
            assert_eq!(c.targets("a", 3).unwrap(), values[15..30]);
            assert_eq!(c.targets("b/c\"d", 3).unwrap(), values[35..40]);
            assert_eq!(c.targets_range("a", 3, 1..3).unwrap(), values[20..30]);
            assert!(c.targets("a", 2).is_err() && c.targets("zz", 1).is_err());
            assert!(c.targets_range("a", 1, 2..4).is_err());
            c.verify().unwrap();
            drop(c);
            // A flipped byte in the data is caught by verify.
            let mut bytes = bytes;
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(dir.join(shard_file_name(7)), &bytes).unwrap();
            let err = format!("{:#}", TeacherCache::open(&dir).unwrap().verify().unwrap_err());
            assert!(err.contains("corrupted"), "{err}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn f16_overflow_and_nan_are_errors_and_leave_no_file() {
        let dir = temp_dir("overflow");
        let plan = [PlannedUtterance {
            id: "x".into(),
            frames: 1,
        }];
        let mut w = ShardWriter::create(&dir, 0, CacheDType::F16, &[1], 2, &plan).unwrap();
        let err = format!("{:#}", w.write_values(&[1.0, 70000.0]).unwrap_err());
        assert!(err.contains("f16") && err.contains("x"), "{err}");
        drop(w);
        let mut w = ShardWriter::create(&dir, 0, CacheDType::F32, &[1], 2, &plan).unwrap();
        assert!(w.write_values(&[f32::NAN, 1.0]).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
