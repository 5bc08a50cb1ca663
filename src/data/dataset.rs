//! Emotion datasets: one [`Dataset`] view (utterance id, audio path, label, speaker, optional split)
//! over three sources, chosen by [`Dataset::open`]:
//!
//! - **EmoDB**: a directory of WAVs named like `03a01Wa.wav` (letters 1-2 speaker, 3-5 text code,
//!   6 emotion: W anger, L boredom, E disgust, A fear, F happiness, T sadness, N neutral; 7 version),
//!   searched recursively. When the directory holds a `wav/` folder (the EmoDB release layout), that
//!   folder is the root. No split: EmoDB is split by speaker.
//! - **IEMOCAP** (release layout): `Session1..5/sentences/wav/<dialog>/<utt>.wav`, labels from
//!   `Session*/dialog/EmoEvaluation/*.txt`. The usual 4-class protocol: `neu` neutral, `hap` and
//!   `exc` happy, `ang` angry, `sad` sad; every other label (fru, sur, fea, dis, oth, xxx) is dropped
//!   and counted. The speaker is session + gender (`Ses01F`), the split is the session folder
//!   (`Session1`): one fold per session for leave-one-session-out evaluation ([`Dataset::fold`]).
//! - **CSV manifest** `path,label,speaker[,split]` for any other corpus: paths relative to the
//!   manifest's folder (which is the root), an optional header row, `#` comments, blank lines,
//!   double-quoted fields. A malformed row is an error naming its line.
//!
//! An utterance's id is its audio path relative to the root, `/`-separated, without the extension
//! (`12a01Fb` for an EmoDB file), or the path as the manifest writes it without the extension.
//! Utterances are sorted by id; ids are unique.
//!
//! [`Dataset::open`] only looks at names and label files; [`check_audio`] then validates every
//! file's WAV header (no full decode).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Seek;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Utterance {
    pub id: String,
    pub path: PathBuf,
    pub label: String,
    pub speaker: String,
    pub split: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    EmoDb,
    Iemocap,
    Manifest,
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetKind::EmoDb => "EmoDB",
            DatasetKind::Iemocap => "IEMOCAP",
            DatasetKind::Manifest => "CSV manifest",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub kind: DatasetKind,
    /// Sorted by id.
    pub utterances: Vec<Utterance>,
}

/// A file found under the dataset root that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unused {
    pub path: PathBuf,
    pub reason: String,
}

/// What [`Dataset::scan`] found: the dataset, the files it left out, and (IEMOCAP) how many
/// utterances each label outside the 4-class protocol dropped.
#[derive(Clone, Debug)]
pub struct Scan {
    pub dataset: Dataset,
    pub unused: Vec<Unused>,
    pub dropped: BTreeMap<String, usize>,
}

/// The 7 EmoDB emotions by their letter in the file name.
pub const EMODB_EMOTIONS: [(char, &str); 7] = [
    ('W', "anger"),
    ('L', "boredom"),
    ('E', "disgust"),
    ('A', "fear"),
    ('F', "happiness"),
    ('T', "sadness"),
    ('N', "neutral"),
];

/// IEMOCAP's label codes kept by the 4-class protocol, and the class each becomes.
pub const IEMOCAP_CLASSES: [(&str, &str); 5] = [
    ("neu", "neutral"),
    ("hap", "happy"),
    ("exc", "happy"),
    ("ang", "angry"),
    ("sad", "sad"),
];

impl Dataset {
    /// Opens a directory (EmoDB or IEMOCAP, detected) or a `.csv` manifest. Files that cannot be
    /// used are left out with a one-line warning on stderr (`wgpu-mlkd dataset` lists them); use
    /// [`Dataset::scan`] to get them.
    pub fn open(path: &Path) -> Result<Dataset> {
        let scan = Dataset::scan(path)?;
        if !scan.unused.is_empty() {
            eprintln!(
                "warning: {}: {} files not used (run `wgpu-mlkd dataset {}` to list them)",
                path.display(),
                scan.unused.len(),
                path.display()
            );
        }
        Ok(scan.dataset)
    }

    /// As [`Dataset::open`], returning what was left out too. Errors name the path.
    pub fn scan(path: &Path) -> Result<Scan> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot open dataset", path.display()))?;
        let mut scan = if meta.is_dir() {
            if is_iemocap(path)? {
                scan_iemocap(path)?
            } else {
                scan_emodb(path)?
            }
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            scan_manifest(path)?
        } else {
            bail!(
                "{}: not a dataset: give a directory (EmoDB or IEMOCAP layout) or a .csv manifest \
                 (path,label,speaker[,split])",
                path.display()
            );
        };
        scan.dataset.utterances.sort_by(|a, b| a.id.cmp(&b.id));
        let dups: Vec<&str> = scan
            .dataset
            .utterances
            .windows(2)
            .filter(|w| w[0].id == w[1].id)
            .map(|w| w[0].id.as_str())
            .collect();
        if !dups.is_empty() {
            bail!(
                "{}: {} duplicate utterance ids (an id is the audio path without its extension): {}",
                path.display(),
                dups.len(),
                dups.join(", ")
            );
        }
        scan.unused.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(scan)
    }

    /// Sorted unique labels.
    pub fn labels(&self) -> Vec<String> {
        self.unique(|u| Some(&u.label))
    }

    /// Sorted unique speakers.
    pub fn speakers(&self) -> Vec<String> {
        self.unique(|u| Some(&u.speaker))
    }

    /// Sorted unique splits (IEMOCAP sessions, manifest splits); empty when there are none.
    pub fn splits(&self) -> Vec<String> {
        self.unique(|u| u.split.as_ref())
    }

    fn unique(&self, key: impl Fn(&Utterance) -> Option<&String>) -> Vec<String> {
        let set: std::collections::BTreeSet<&String> = self.utterances.iter().filter_map(key).collect();
        set.into_iter().cloned().collect()
    }

    /// Leave-one-split-out: `(train, test)`, where test is every utterance of split `held_out` and
    /// train is every other utterance (those without a split included).
    pub fn fold(&self, held_out: &str) -> Result<(Vec<&Utterance>, Vec<&Utterance>)> {
        let (test, train): (Vec<&Utterance>, Vec<&Utterance>) = self
            .utterances
            .iter()
            .partition(|u| u.split.as_deref() == Some(held_out));
        if test.is_empty() {
            bail!(
                "{}: no utterances in split {held_out:?} (splits: {})",
                self.root.display(),
                show_list(&self.splits())
            );
        }
        Ok((train, test))
    }

    /// Removes the utterances whose check failed; returns how many it removed.
    pub fn drop_bad(&mut self, checks: &[AudioCheck]) -> usize {
        let bad: HashSet<&str> = checks
            .iter()
            .filter(|c| c.result.is_err())
            .map(|c| c.id.as_str())
            .collect();
        let before = self.utterances.len();
        self.utterances.retain(|u| !bad.contains(u.id.as_str()));
        before - self.utterances.len()
    }
}

fn show_list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Audio checks

#[derive(Clone, Debug, PartialEq)]
pub struct AudioInfo {
    pub sample_rate: u32,
    pub channels: u16,
    pub bits: u16,
    pub frames: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AudioCheck {
    pub id: String,
    pub path: PathBuf,
    pub result: Result<AudioInfo, String>,
}

/// Header-level validation of every utterance's file, in utterance order.
pub fn check_audio(ds: &Dataset) -> Vec<AudioCheck> {
    ds.utterances
        .iter()
        .map(|u| AudioCheck {
            id: u.id.clone(),
            path: u.path.clone(),
            result: check_file(&u.path),
        })
        .collect()
}

/// Reads one file's WAV header: format, rate, channels, and that the data chunk is all there.
/// Errors are what `wav::read_wav` would say (without the path), so a file that passes here fails
/// only on its sample values (NaN or infinite floats).
pub fn check_file(path: &Path) -> Result<AudioInfo, String> {
    let file_len = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err("is a directory, not a WAV file".into()),
        Ok(m) => m.len(),
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    if file_len == 0 {
        return Err("empty file (0 bytes), not a WAV file".into());
    }
    let reader = match hound::WavReader::open(path) {
        Ok(r) => r,
        Err(e) => {
            // read_wav fails at the same point (hound's header parse) and words the problem
            // precisely; it never gets as far as decoding samples here.
            return Err(match super::wav::read_wav(path) {
                Err(err) => strip_path(path, &format!("{err:#}")),
                Ok(_) => format!("invalid WAV header ({e})"),
            });
        }
    };
    let spec = reader.spec();
    if spec.sample_rate == 0 {
        return Err("sample rate is 0 Hz".into());
    }
    if spec.channels == 0 {
        return Err("0 channels".into());
    }
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 8 | 16 | 24 | 32) | (hound::SampleFormat::Float, 32) => {}
        (hound::SampleFormat::Int, b) => {
            return Err(format!("unsupported encoding: {b}-bit integer PCM (only 8/16/24/32)"))
        }
        (hound::SampleFormat::Float, b) => return Err(format!("unsupported encoding: {b}-bit float (only 32-bit)")),
    }
    let frames = reader.duration() as u64;
    let total = reader.len() as u64;
    if frames == 0 {
        return Err("contains no audio samples (empty data chunk)".into());
    }
    // hound leaves the reader at the first data byte; the data must fit in the file.
    let bytes_per_sample = spec.bits_per_sample.div_ceil(8) as u64;
    let data_start = match reader.into_inner().stream_position() {
        Ok(p) => p,
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let held = file_len.saturating_sub(data_start) / bytes_per_sample;
    if held < total {
        return Err(format!(
            "truncated: header says {total} samples ({frames} frames x {} channels), file holds \
             {held}",
            spec.channels
        ));
    }
    Ok(AudioInfo {
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        bits: spec.bits_per_sample,
        frames,
        seconds: frames as f64 / spec.sample_rate as f64,
    })
}

fn strip_path(path: &Path, msg: &str) -> String {
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix).unwrap_or(msg).to_string()
}

// ---------------------------------------------------------------------------------------------
// Directory walking

/// Deepest folder nesting searched (guards against symlink loops).
const MAX_DEPTH: usize = 16;

/// Every `.wav` file under `dir` (case-insensitive extension, hidden names skipped), sorted.
fn find_wavs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!(
            "{}: folders nested deeper than {MAX_DEPTH} levels (a symlink loop?)",
            dir.display()
        );
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list folder", dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks, so linked folders and files count.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, depth + 1, out)?;
        } else if is_wav_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_wav_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"))
}

/// `rel` without its extension, `/`-separated.
fn id_of(rel: &Path) -> String {
    let no_ext = rel.with_extension("");
    let parts: Vec<String> = no_ext
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("/")
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// EmoDB

/// `(speaker, label)` of an EmoDB file stem such as `03a01Wa`, or why it is not one.
pub fn parse_emodb_name(stem: &str) -> Result<(String, String), String> {
    let c: Vec<char> = stem.chars().collect();
    let shape_ok = c.len() == 7
        && c[0].is_ascii_digit()
        && c[1].is_ascii_digit()
        && c[2].is_ascii_lowercase()
        && c[3].is_ascii_digit()
        && c[4].is_ascii_digit()
        && c[6].is_ascii_lowercase();
    if !shape_ok {
        return Err(
            "name is not in EmoDB form (like 03a01Wa: speaker 2 digits, text code, emotion \
             letter, version letter)"
                .into(),
        );
    }
    match EMODB_EMOTIONS.iter().find(|(l, _)| *l == c[5]) {
        Some((_, label)) => Ok((stem[..2].to_string(), label.to_string())),
        None => Err(format!(
            "unknown EmoDB emotion letter {:?} (letter 6; expected one of W L E A F T N)",
            c[5]
        )),
    }
}

fn scan_emodb(dir: &Path) -> Result<Scan> {
    // The EmoDB release keeps its audio in wav/ beside lablaut/, silb/ etc.
    let wav_dir = dir.join("wav");
    let root = if wav_dir.is_dir() { wav_dir } else { dir.to_path_buf() };
    let files = find_wavs(&root)?;
    let mut utterances = Vec::new();
    let mut unused = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&root).unwrap_or(&path);
        match parse_emodb_name(&file_stem(&path)) {
            Ok((speaker, label)) => utterances.push(Utterance {
                id: id_of(rel),
                path: path.clone(),
                label,
                speaker,
                split: None,
            }),
            Err(reason) => unused.push(Unused { path, reason }),
        }
    }
    if utterances.is_empty() {
        let seen = if unused.is_empty() {
            "it holds no .wav files".to_string()
        } else {
            let names: Vec<String> = unused
                .iter()
                .take(3)
                .map(|u| u.path.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect();
            format!(
                "none of its {} .wav files is named like one (e.g. {})",
                unused.len(),
                names.join(", ")
            )
        };
        bail!(
            "{}: not a dataset: expected EmoDB file names (like 03a01Wa.wav) or IEMOCAP's \
             Session1..5 folders, but {seen}; for another corpus write a CSV manifest \
             path,label,speaker[,split]",
            dir.display()
        );
    }
    Ok(Scan {
        dataset: Dataset {
            root,
            kind: DatasetKind::EmoDb,
            utterances,
        },
        unused,
        dropped: BTreeMap::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// IEMOCAP

/// `SessionN` folders (N = 1..99) directly under `dir`, sorted by N.
fn session_dirs(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("Session").and_then(|n| n.parse::<u32>().ok()) {
            if entry.path().is_dir() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_iemocap(dir: &Path) -> Result<bool> {
    Ok(session_dirs(dir)?
        .iter()
        .any(|(_, s)| s.join("dialog/EmoEvaluation").is_dir() || s.join("sentences/wav").is_dir()))
}

/// Speaker (`Ses01F`) of an IEMOCAP utterance id such as `Ses01F_impro01_F000` or
/// `Ses01M_script01_1_M012`: the session, then the gender letter that starts the last part.
fn iemocap_speaker(utt: &str) -> Option<String> {
    let session = utt
        .get(..5)
        .filter(|s| s.starts_with("Ses") && s[3..].chars().all(|c| c.is_ascii_digit()))?;
    let (_, last) = utt.rsplit_once('_')?;
    let gender = last.chars().next().filter(|g| *g == 'F' || *g == 'M')?;
    Some(format!("{session}{gender}"))
}

fn scan_iemocap(dir: &Path) -> Result<Scan> {
    let mut utterances = Vec::new();
    let mut unused = Vec::new();
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let keep: HashMap<&str, &str> = IEMOCAP_CLASSES.iter().copied().collect();
    for (n, session) in session_dirs(dir)? {
        let split = format!("Session{n}");
        let eval_dir = session.join("dialog/EmoEvaluation");
        let wav_dir = session.join("sentences/wav");
        if !eval_dir.is_dir() {
            bail!(
                "{}: IEMOCAP layout, but {} is missing (labels come from its *.txt files)",
                dir.display(),
                eval_dir.display()
            );
        }
        // utt -> (raw label, label file, line)
        let mut labels: BTreeMap<String, (String, PathBuf, usize)> = BTreeMap::new();
        let mut txts: Vec<PathBuf> = std::fs::read_dir(&eval_dir)
            .with_context(|| format!("{}: cannot list folder", eval_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"))
                    && !p.file_name().unwrap_or_default().to_string_lossy().starts_with('.')
            })
            .collect();
        txts.sort();
        for txt in txts {
            let text =
                std::fs::read_to_string(&txt).with_context(|| format!("{}: cannot read label file", txt.display()))?;
            // Summary lines look like "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]";
            // the per-evaluator lines after them start with "C-" or "A-".
            for (i, line) in text.lines().enumerate() {
                let Some(rest) = line.trim_start().strip_prefix('[') else {
                    continue;
                };
                let Some((_, after)) = rest.split_once(']') else {
                    continue;
                };
                let mut fields = after.split_whitespace();
                let (Some(utt), Some(label)) = (fields.next(), fields.next()) else {
                    bail!(
                        "{}:{}: expected \"[start - end] utterance label [v, a, d]\", found {line:?}",
                        txt.display(),
                        i + 1
                    );
                };
                if let Some((old, old_file, old_line)) = labels.get(utt) {
                    if old != label {
                        bail!(
                            "{utt} is labelled {old:?} at {}:{old_line} and {label:?} at {}:{}",
                            old_file.display(),
                            txt.display(),
                            i + 1
                        );
                    }
                    continue;
                }
                labels.insert(utt.to_string(), (label.to_string(), txt.clone(), i + 1));
            }
        }
        let wavs = if wav_dir.is_dir() {
            find_wavs(&wav_dir)?
        } else {
            Vec::new()
        };
        let mut seen: HashSet<String> = HashSet::new();
        for path in &wavs {
            let stem = file_stem(path);
            if !labels.contains_key(&stem) {
                unused.push(Unused {
                    path: path.clone(),
                    reason: format!("no label for {stem} in {}", eval_dir.display()),
                });
            }
            seen.insert(stem);
        }
        for (utt, (raw, file, line)) in labels {
            let Some(class) = keep.get(raw.as_str()) else {
                *dropped.entry(raw).or_default() += 1;
                continue;
            };
            let Some((dialog, _)) = utt.rsplit_once('_') else {
                bail!("{}:{line}: utterance id {utt:?} has no dialog part", file.display());
            };
            let path = wav_dir.join(dialog).join(format!("{utt}.wav"));
            let Some(speaker) = iemocap_speaker(&utt) else {
                unused.push(Unused {
                    path,
                    reason: format!(
                        "{}:{line}: cannot tell the speaker of {utt:?} (expected like \
                         Ses01F_impro01_F000)",
                        file.display()
                    ),
                });
                continue;
            };
            // A labelled utterance whose audio is missing stays in: check_audio reports it, so a
            // partial copy of the corpus is an error, not a silently smaller dataset.
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            utterances.push(Utterance {
                id: id_of(rel),
                path,
                label: class.to_string(),
                speaker,
                split: Some(split.clone()),
            });
        }
    }
    if utterances.is_empty() {
        bail!(
            "{}: IEMOCAP layout, but no utterance has one of the 4-class labels (neu, hap, exc, \
             ang, sad)",
            dir.display()
        );
    }
    Ok(Scan {
        dataset: Dataset {
            root: dir.to_path_buf(),
            kind: DatasetKind::Iemocap,
            utterances,
        },
        unused,
        dropped,
    })
}

// ---------------------------------------------------------------------------------------------
// CSV manifest

/// Splits one CSV line: fields separated by commas, optionally double-quoted (`""` is a quote
/// inside a quoted field), surrounding spaces trimmed.
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    loop {
        // Start of a field.
        while chars.peek() == Some(&' ') || chars.peek() == Some(&'\t') {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("unterminated quoted field".into()),
                }
            }
            while chars.peek() == Some(&' ') || chars.peek() == Some(&'\t') {
                chars.next();
            }
            match chars.next() {
                None => {
                    out.push(std::mem::take(&mut field));
                    return Ok(out);
                }
                Some(',') => out.push(std::mem::take(&mut field)),
                Some(c) => return Err(format!("unexpected {c:?} after a quoted field")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field.trim().to_string());
                        return Ok(out);
                    }
                    Some(',') => {
                        out.push(std::mem::take(&mut field).trim().to_string());
                        break;
                    }
                    Some(c) => field.push(c),
                }
            }
        }
    }
}

fn scan_manifest(csv: &Path) -> Result<Scan> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("{}: cannot read manifest", csv.display()))?;
    let root = match csv.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut utterances = Vec::new();
    let mut bad: Vec<String> = Vec::new();
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = match split_csv(line) {
            Ok(f) => f,
            Err(e) => {
                bad.push(format!("line {n}: {e}"));
                continue;
            }
        };
        let is_header = first
            && fields.len() >= 3
            && fields[0].eq_ignore_ascii_case("path")
            && fields[1].eq_ignore_ascii_case("label")
            && fields[2].eq_ignore_ascii_case("speaker");
        first = false;
        if is_header {
            continue;
        }
        if fields.len() != 3 && fields.len() != 4 {
            bad.push(format!(
                "line {n}: expected 3 or 4 columns (path,label,speaker[,split]), found {}",
                fields.len()
            ));
            continue;
        }
        let missing: Vec<&str> = ["path", "label", "speaker"]
            .iter()
            .zip(&fields)
            .filter(|(_, v)| v.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            bad.push(format!("line {n}: empty {}", missing.join(", ")));
            continue;
        }
        let written = Path::new(&fields[0]);
        let split = fields.get(3).filter(|s| !s.is_empty()).cloned();
        utterances.push(Utterance {
            id: fields[0]
                .rsplit_once('.')
                .filter(|(_, ext)| !ext.contains('/') && !ext.contains('\\'))
                .map(|(stem, _)| stem.to_string())
                .unwrap_or_else(|| fields[0].clone()),
            path: root.join(written),
            label: fields[1].clone(),
            speaker: fields[2].clone(),
            split,
        });
    }
    if !bad.is_empty() {
        bail!(
            "{}: {} bad rows (format: path,label,speaker[,split], paths relative to the manifest):\n  {}",
            csv.display(),
            bad.len(),
            bad.join("\n  ")
        );
    }
    if utterances.is_empty() {
        bail!("{}: the manifest lists no utterances", csv.display());
    }
    Ok(Scan {
        dataset: Dataset {
            root,
            kind: DatasetKind::Manifest,
            utterances,
        },
        unused: Vec::new(),
        dropped: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::wav::write_wav_i16;

    /// A fresh empty folder per test, removed when dropped.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("wgpu-mlkd-dataset-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        pub fn file(&self, rel: &str) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tone(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.05).sin() * 0.3).collect()
    }

    fn write(dir: &TempDir, rel: &str, frames: usize, rate: u32) -> PathBuf {
        let p = dir.file(rel);
        write_wav_i16(&p, &tone(frames), rate).unwrap();
        p
    }

    fn shared_data(rel: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(rel);
        if p.exists() {
            Some(p)
        } else {
            eprintln!("SKIPPED: {} is absent (the shared development data)", p.display());
            None
        }
    }

    #[test]
    fn emodb_names_parse() {
        assert_eq!(
            parse_emodb_name("03a01Wa").unwrap(),
            ("03".to_string(), "anger".to_string())
        );
        assert_eq!(parse_emodb_name("16b10Td").unwrap().1, "sadness");
        assert!(parse_emodb_name("03a01Xa").unwrap_err().contains("emotion letter"));
        assert!(parse_emodb_name("3a01Wa").unwrap_err().contains("EmoDB form"));
        assert!(parse_emodb_name("readme").is_err());
    }

    #[test]
    fn emodb_fake_tree() {
        let dir = TempDir::new("emodb");
        write(&dir, "wav/03a01Wa.wav", 1600, 16000);
        write(&dir, "wav/03a01Nc.wav", 800, 16000);
        write(&dir, "wav/12a01Fb.wav", 2205, 22050);
        write(&dir, "wav/sub/16b10Td.wav", 100, 8000);
        write(&dir, "wav/notes.wav", 100, 8000);
        write(&dir, "wav/03a01Xa.wav", 100, 8000);
        std::fs::write(dir.file("wav/readme.txt"), "x").unwrap();
        write(&dir, "lablaut/ignored.wav", 10, 8000);
        let scan = Dataset::scan(&dir.0).unwrap();
        let ds = &scan.dataset;
        assert_eq!(ds.kind, DatasetKind::EmoDb);
        assert_eq!(ds.root, dir.0.join("wav"));
        let ids: Vec<&str> = ds.utterances.iter().map(|u| u.id.as_str()).collect();
        assert_eq!(ids, ["03a01Nc", "03a01Wa", "12a01Fb", "sub/16b10Td"]);
        assert_eq!(ds.utterances[2].label, "happiness");
        assert_eq!(ds.utterances[2].speaker, "12");
        assert_eq!(ds.utterances[2].path, dir.0.join("wav/12a01Fb.wav"));
        assert_eq!(ds.labels(), ["anger", "happiness", "neutral", "sadness"]);
        assert_eq!(ds.speakers(), ["03", "12", "16"]);
        assert!(ds.splits().is_empty());
        let unused: Vec<String> = scan
            .unused
            .iter()
            .map(|u| u.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(unused, ["03a01Xa.wav", "notes.wav"]);
        let checks = check_audio(ds);
        assert!(checks.iter().all(|c| c.result.is_ok()), "{checks:?}");
        let info = checks[2].result.as_ref().unwrap();
        assert_eq!(
            (info.sample_rate, info.channels, info.bits, info.frames),
            (22050, 1, 16, 2205)
        );
        assert!((info.seconds - 0.1).abs() < 1e-12);

        // Opening the wav/ folder itself gives the same ids.
        let ds2 = Dataset::open(&dir.0.join("wav")).unwrap();
        assert_eq!(ds2.utterances, ds.utterances);
    }

    #[test]
    fn not_a_dataset_errors_name_the_path() {
        let dir = TempDir::new("none");
        let err = format!("{:#}", Dataset::open(&dir.0).unwrap_err());
        assert!(
            err.contains(&dir.0.display().to_string()) && err.contains("no .wav"),
            "{err}"
        );
        write(&dir, "a.wav", 10, 8000);
        let err = format!("{:#}", Dataset::open(&dir.0).unwrap_err());
        assert!(err.contains("a.wav") && err.contains("manifest"), "{err}");
        let missing = dir.0.join("missing");
        let err = format!("{:#}", Dataset::open(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let txt = dir.file("x.txt");
        std::fs::write(&txt, "x").unwrap();
        let err = format!("{:#}", Dataset::open(&txt).unwrap_err());
        assert!(err.contains("x.txt") && err.contains(".csv"), "{err}");
    }

    #[test]
    fn emodb_real_dev_set() {
        let Some(dir) = shared_data("emodb-dev") else {
            return;
        };
        let scan = Dataset::scan(&dir).unwrap();
        let ds = &scan.dataset;
        assert_eq!(ds.kind, DatasetKind::EmoDb);
        assert_eq!(ds.utterances.len(), 304);
        assert!(scan.unused.is_empty(), "{:?}", scan.unused);
        assert_eq!(ds.speakers(), ["03", "08", "09", "10", "11", "13"]);
        assert_eq!(
            ds.labels(),
            ["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"]
        );
        assert!(ds.utterances.iter().any(|u| u.id == "03a01Wa"));
        let checks = check_audio(ds);
        let mut rates = BTreeMap::new();
        let mut total = 0.0;
        for c in &checks {
            let info = c
                .result
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: {e}", c.path.display()));
            *rates.entry((info.sample_rate, info.channels, info.bits)).or_insert(0) += 1;
            total += info.seconds;
        }
        eprintln!("emodb-dev: {rates:?}, {total:.1} s");
        assert_eq!(rates.len(), 1);
        assert!((total - 608.0).abs() < 1.0, "{total}");
    }

    /// A small IEMOCAP tree: two sessions, every label kind, a wav without a label, a labelled
    /// utterance without its wav.
    fn fake_iemocap(dir: &TempDir) {
        let s1 = "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n\
                  C-E2:\tNeutral;\t()\n\
                  A-E3:\tval 3; act 2; dom  2;\t()\n\
                  \n\
                  [10.0100 - 11.3925]\tSes01F_impro01_F001\thap\t[4.0, 3.0, 3.0]\n\
                  [14.8872 - 18.0175]\tSes01F_impro01_M000\texc\t[4.0, 3.0, 3.0]\n\
                  [19.0 - 20.0]\tSes01F_impro01_M001\tfru\t[2.0, 3.0, 3.0]\n\
                  [21.0 - 22.0]\tSes01F_impro01_M002\txxx\t[2.0, 3.0, 3.0]\n";
        std::fs::write(dir.file("Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"), s1).unwrap();
        let s1b = "[1.0 - 2.0]\tSes01M_script01_1_F000\tang\t[2.0, 4.0, 4.0]\n";
        std::fs::write(dir.file("Session1/dialog/EmoEvaluation/Ses01M_script01_1.txt"), s1b).unwrap();
        let s2 = "[1.0 - 2.0]\tSes02F_impro03_M000\tsad\t[2.0, 2.0, 2.0]\n\
                  [3.0 - 4.0]\tSes02F_impro03_F000\tsur\t[2.0, 2.0, 2.0]\n\
                  [5.0 - 6.0]\tSes02F_impro03_F001\tneu\t[2.0, 2.0, 2.0]\n";
        std::fs::write(dir.file("Session2/dialog/EmoEvaluation/Ses02F_impro03.txt"), s2).unwrap();
        std::fs::create_dir_all(dir.0.join("Session1/dialog/EmoEvaluation/Categorical")).unwrap();
        for utt in [
            "Ses01F_impro01/Ses01F_impro01_F000",
            "Ses01F_impro01/Ses01F_impro01_F001",
            "Ses01F_impro01/Ses01F_impro01_M000",
            "Ses01F_impro01/Ses01F_impro01_M001",
            "Ses01F_impro01/Ses01F_impro01_M002",
            "Ses01F_impro01/Ses01F_impro01_M099",
            "Ses01M_script01_1/Ses01M_script01_1_F000",
        ] {
            write(dir, &format!("Session1/sentences/wav/{utt}.wav"), 160, 16000);
        }
        write(
            dir,
            "Session2/sentences/wav/Ses02F_impro03/Ses02F_impro03_M000.wav",
            160,
            16000,
        );
        write(
            dir,
            "Session2/sentences/wav/Ses02F_impro03/Ses02F_impro03_F000.wav",
            160,
            16000,
        );
        // Ses02F_impro03_F001 is labelled but its wav is missing.
        std::fs::write(
            dir.file("Session1/sentences/wav/Ses01F_impro01/._Ses01F_impro01_F000.wav"),
            "",
        )
        .unwrap();
    }

    #[test]
    fn iemocap_fake_tree() {
        let dir = TempDir::new("iemocap");
        fake_iemocap(&dir);
        let scan = Dataset::scan(&dir.0).unwrap();
        let ds = &scan.dataset;
        assert_eq!(ds.kind, DatasetKind::Iemocap);
        let got: Vec<(&str, &str, &str, Option<&str>)> = ds
            .utterances
            .iter()
            .map(|u| (u.id.as_str(), u.label.as_str(), u.speaker.as_str(), u.split.as_deref()))
            .collect();
        let w1 = "Session1/sentences/wav/Ses01F_impro01/";
        let w1s = "Session1/sentences/wav/Ses01M_script01_1/";
        let w2 = "Session2/sentences/wav/Ses02F_impro03/";
        let want: Vec<(String, &str, &str, Option<&str>)> = vec![
            (
                format!("{w1}Ses01F_impro01_F000"),
                "neutral",
                "Ses01F",
                Some("Session1"),
            ),
            (format!("{w1}Ses01F_impro01_F001"), "happy", "Ses01F", Some("Session1")),
            (format!("{w1}Ses01F_impro01_M000"), "happy", "Ses01M", Some("Session1")),
            (
                format!("{w1s}Ses01M_script01_1_F000"),
                "angry",
                "Ses01F",
                Some("Session1"),
            ),
            (
                format!("{w2}Ses02F_impro03_F001"),
                "neutral",
                "Ses02F",
                Some("Session2"),
            ),
            (format!("{w2}Ses02F_impro03_M000"), "sad", "Ses02M", Some("Session2")),
        ];
        let want: Vec<(&str, &str, &str, Option<&str>)> =
            want.iter().map(|(a, b, c, d)| (a.as_str(), *b, *c, *d)).collect();
        assert_eq!(got, want);
        assert_eq!(ds.labels(), ["angry", "happy", "neutral", "sad"]);
        assert_eq!(ds.splits(), ["Session1", "Session2"]);
        assert_eq!(
            scan.dropped,
            BTreeMap::from([("fru".into(), 1), ("sur".into(), 1), ("xxx".into(), 1)])
        );
        assert_eq!(scan.unused.len(), 1);
        assert!(scan.unused[0].path.ends_with("Ses01F_impro01_M099.wav"));
        assert!(scan.unused[0].reason.contains("no label"), "{:?}", scan.unused);

        // Leave-one-session-out.
        let (train, test) = ds.fold("Session2").unwrap();
        assert_eq!((train.len(), test.len()), (4, 2));
        assert!(test.iter().all(|u| u.speaker.starts_with("Ses02")));
        assert!(ds.fold("Session5").is_err());

        // The labelled utterance without audio is a bad file.
        let checks = check_audio(ds);
        let bad: Vec<&AudioCheck> = checks.iter().filter(|c| c.result.is_err()).collect();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].id.ends_with("Ses02F_impro03_F001"));
        assert!(bad[0].result.as_ref().unwrap_err().contains("cannot open"));
        let mut ds = ds.clone();
        assert_eq!(ds.drop_bad(&checks), 1);
        assert_eq!(ds.utterances.len(), 5);
    }

    #[test]
    fn iemocap_conflicting_labels_are_an_error() {
        let dir = TempDir::new("iemocap-conflict");
        let t = "[1.0 - 2.0]\tSes01F_impro01_F000\tneu\t[2.0, 2.0, 2.0]\n";
        std::fs::write(dir.file("Session1/dialog/EmoEvaluation/a.txt"), t).unwrap();
        let t = "[1.0 - 2.0]\tSes01F_impro01_F000\tang\t[2.0, 2.0, 2.0]\n";
        std::fs::write(dir.file("Session1/dialog/EmoEvaluation/b.txt"), t).unwrap();
        let err = format!("{:#}", Dataset::open(&dir.0).unwrap_err());
        assert!(err.contains("a.txt:1") && err.contains("b.txt:1"), "{err}");
    }

    #[test]
    fn manifest_relative_paths_and_optional_split() {
        let dir = TempDir::new("manifest");
        write(&dir, "clips/a01.wav", 320, 16000);
        write(&dir, "clips/b 02.wav", 480, 48000);
        write(&dir, "other/c03.wav", 160, 8000);
        let csv = dir.file("m/list.csv");
        std::fs::write(
            &csv,
            "path,label,speaker,split\n\
             # a comment\n\
             ../clips/a01.wav,happy,s1,train\n\
             \n\
             \"../clips/b 02.wav\", sad , s2\n\
             ../other/c03.wav,happy,s2,\n",
        )
        .unwrap();
        let ds = Dataset::open(&csv).unwrap();
        assert_eq!(ds.kind, DatasetKind::Manifest);
        assert_eq!(ds.root, dir.0.join("m"));
        let got: Vec<(&str, &str, &str, Option<&str>)> = ds
            .utterances
            .iter()
            .map(|u| (u.id.as_str(), u.label.as_str(), u.speaker.as_str(), u.split.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("../clips/a01", "happy", "s1", Some("train")),
                ("../clips/b 02", "sad", "s2", None),
                ("../other/c03", "happy", "s2", None),
            ]
        );
        assert_eq!(ds.utterances[1].path, dir.0.join("m/../clips/b 02.wav"));
        assert!(check_audio(&ds).iter().all(|c| c.result.is_ok()));
        assert_eq!(ds.splits(), ["train"]);

        // No header, three columns only.
        let csv2 = dir.file("flat.csv");
        std::fs::write(&csv2, "clips/a01.wav,happy,s1\nother/c03.wav,sad,s3\n").unwrap();
        let ds = Dataset::open(&csv2).unwrap();
        assert_eq!(ds.utterances[0].id, "clips/a01");
        assert_eq!(ds.utterances[1].path, dir.0.join("other/c03.wav"));
        assert!(ds.splits().is_empty());
    }

    #[test]
    fn manifest_bad_rows_are_reported_with_line_numbers() {
        let dir = TempDir::new("manifest-bad");
        let csv = dir.file("bad.csv");
        std::fs::write(
            &csv,
            "path,label,speaker\n\
             a.wav,happy,s1\n\
             b.wav,happy\n\
             c.wav,,s1\n\
             \"d.wav,happy,s1\n\
             e.wav,sad,s1,train,extra\n",
        )
        .unwrap();
        let err = format!("{:#}", Dataset::open(&csv).unwrap_err());
        eprintln!("{err}");
        assert!(err.contains("bad.csv") && err.contains("4 bad rows"), "{err}");
        for needle in [
            "line 3: expected 3 or 4 columns",
            "line 4: empty label",
            "line 5: unterminated",
            "line 6: expected 3 or 4 columns (path,label,speaker[,split]), found 5",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        let dup = dir.file("dup.csv");
        std::fs::write(&dup, "a.wav,happy,s1\na.flac,sad,s1\n").unwrap();
        let err = format!("{:#}", Dataset::open(&dup).unwrap_err());
        assert!(err.contains("duplicate") && err.contains('a'), "{err}");
        let empty = dir.file("empty.csv");
        std::fs::write(&empty, "path,label,speaker\n").unwrap();
        assert!(format!("{:#}", Dataset::open(&empty).unwrap_err()).contains("no utterances"));
    }

    #[test]
    fn bad_files_are_listed_with_reasons() {
        let dir = TempDir::new("badfiles");
        write(&dir, "03a01Wa.wav", 160, 16000);
        std::fs::write(dir.file("03a02Wa.wav"), b"").unwrap();
        std::fs::write(dir.file("03a03Wa.wav"), b"ID3\x03 this is an mp3").unwrap();
        let good = std::fs::read(dir.0.join("03a01Wa.wav")).unwrap();
        std::fs::write(dir.file("03a04Wa.wav"), &good[..good.len() - 11]).unwrap();
        std::fs::write(dir.file("03a05Wa.wav"), &good[..30]).unwrap();
        // A header with a 0 Hz rate.
        let mut zero = good.clone();
        zero[24..28].copy_from_slice(&0u32.to_le_bytes());
        std::fs::write(dir.file("03a06Wa.wav"), &zero).unwrap();
        // Header only, no samples.
        std::fs::write(dir.file("03a07Wa.wav"), {
            let mut h = good[..44].to_vec();
            h[40..44].copy_from_slice(&0u32.to_le_bytes());
            h
        })
        .unwrap();
        std::fs::create_dir_all(dir.0.join("03a08Wa.wav")).unwrap();

        let ds = Dataset::open(&dir.0).unwrap();
        let checks = check_audio(&ds);
        let reasons: Vec<(&str, String)> = checks
            .iter()
            .map(|c| (c.id.as_str(), c.result.as_ref().err().cloned().unwrap_or_default()))
            .collect();
        for r in &reasons {
            eprintln!("{r:?}");
        }
        assert_eq!(reasons.len(), 7, "the folder named .wav is not a file");
        assert_eq!(reasons[0], ("03a01Wa", String::new()));
        assert!(reasons[1].1.contains("empty file"));
        assert!(reasons[2].1.contains("not a WAV file"));
        assert!(
            reasons[3].1.contains("truncated: header says 160 samples"),
            "{:?}",
            reasons[3]
        );
        assert!(reasons[4].1.contains("truncated header"));
        assert!(reasons[5].1.contains("0 Hz"));
        assert!(reasons[6].1.contains("no audio samples"));
        // The messages do not repeat the path (the caller shows it beside them).
        assert!(!reasons[1].1.contains(&dir.0.display().to_string()));
        // Whatever passes the header check decodes.
        for c in &checks {
            assert_eq!(c.result.is_ok(), crate::data::wav::read_wav(&c.path).is_ok(), "{c:?}");
        }
    }
}
