//! PLACEHOLDER, TO BE REPLACED AT MERGE by the real dataset module (branch data-dataset-noise), which has
//! the same public names and also reads IEMOCAP trees and CSV manifests. This stand-in exists only so that
//! `cache-teacher` builds and is tested on its branch: it implements `Dataset::open` for a flat directory of
//! EmoDB-named WAV files (id = file stem, label = letter 6, speaker = letters 1-2).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// One labelled recording.
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

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub kind: DatasetKind,
    /// Sorted by id.
    pub utterances: Vec<Utterance>,
}

impl Dataset {
    /// Placeholder: a flat directory of EmoDB-named `.wav` files only.
    pub fn open(path: &Path) -> Result<Dataset> {
        if !path.is_dir() {
            bail!(
                "{}: not a directory (the placeholder dataset reader takes a flat EmoDB folder)",
                path.display()
            );
        }
        let mut utterances = Vec::new();
        for entry in std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))? {
            let entry = entry?;
            let p = entry.path();
            let is_wav = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"));
            if !is_wav || !p.is_file() {
                continue;
            }
            let id = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let chars: Vec<char> = id.chars().collect();
            if chars.len() < 7 {
                bail!("{}: not an EmoDB file name (e.g. 03a01Fa.wav)", p.display());
            }
            utterances.push(Utterance {
                label: chars[5].to_string(),
                speaker: chars[..2].iter().collect(),
                id,
                path: p,
                split: None,
            });
        }
        if utterances.is_empty() {
            bail!("{}: no .wav files", path.display());
        }
        utterances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Dataset {
            root: path.to_path_buf(),
            kind: DatasetKind::EmoDb,
            utterances,
        })
    }

    pub fn labels(&self) -> Vec<String> {
        let mut v: Vec<String> = self.utterances.iter().map(|u| u.label.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn speakers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.utterances.iter().map(|u| u.speaker.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}
