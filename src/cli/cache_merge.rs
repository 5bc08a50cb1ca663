//! `wgpu-mlkd cache-merge OUT CACHE...`: joins caches made with `cache-teacher --shard K/N` (or disjoint
//! caches of the same teacher) into one cache, verified before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::Cli;
use crate::data::cache::{self, Manifest, ShardEntry, Subset, TeacherCache};
use crate::fsutil::OutputLock;

#[derive(clap::Args)]
pub struct Args {
    /// The merged cache (a new or empty directory)
    #[arg(value_name = "OUT")]
    out: PathBuf,
    /// The caches to join
    #[arg(value_name = "CACHE", required = true, num_args = 1..)]
    caches: Vec<PathBuf>,
}

/// The merged cache's subset: none when the parts are whole caches, or when they are all N parts of one
/// `--shard K/N` split; anything else (a missing or repeated part, mixed splits) is an error.
fn merged_subset(parts: &[(PathBuf, Option<Subset>)]) -> Result<Option<Subset>> {
    let split: Vec<(&PathBuf, Subset)> = parts.iter().filter_map(|(p, s)| s.map(|s| (p, s))).collect();
    if split.is_empty() {
        return Ok(None);
    }
    if split.len() != parts.len() {
        bail!("cannot merge a --shard part with a whole cache");
    }
    let n = split[0].1.count;
    if let Some((p, s)) = split.iter().find(|(_, s)| s.count != n) {
        bail!(
            "{} is part {s} of another split than {} (N = {n})",
            p.display(),
            split[0].0.display()
        );
    }
    let mut seen = BTreeMap::new();
    for (p, s) in &split {
        if let Some(other) = seen.insert(s.index, *p) {
            bail!("{} and {} are both part {s}", other.display(), p.display());
        }
    }
    let missing: Vec<String> = (0..n)
        .filter(|k| !seen.contains_key(k))
        .map(|k| format!("{k}/{n}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "parts {} are missing; merge all N parts of the split",
            missing.join(", ")
        );
    }
    Ok(None)
}

fn copy_durably(from: &Path, to: &Path) -> Result<()> {
    let name = to.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let tmp = to.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        std::fs::copy(from, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

pub fn run(_cli: &Cli, args: &Args) -> Result<()> {
    let out = &args.out;
    if out.exists() {
        // Empty but for a lock file: the lock below says who holds it.
        let empty = out.is_dir()
            && std::fs::read_dir(out)?
                .flatten()
                .all(|e| crate::fsutil::is_lock_file(&e.file_name().to_string_lossy()));
        if !empty {
            bail!("cache-merge: {} exists and is not an empty directory", out.display());
        }
    }
    let mut caches = Vec::new();
    for dir in &args.caches {
        let c = TeacherCache::open(dir).with_context(|| format!("cache-merge: {}", dir.display()))?;
        let r = c.verify().with_context(|| format!("cache-merge: {}", dir.display()))?;
        eprintln!(
            "cache-merge: {} verified: {} utterances in {} shards",
            dir.display(),
            r.utterances,
            r.shards
        );
        caches.push(c);
    }
    let first = caches[0].manifest().clone();
    for (dir, c) in args.caches.iter().zip(&caches).skip(1) {
        let diffs = first.incompatibilities(c.manifest());
        if !diffs.is_empty() {
            bail!(
                "cache-merge: {} and {} were made with other settings:\n  {}",
                args.caches[0].display(),
                dir.display(),
                diffs.join("\n  ")
            );
        }
    }
    let parts: Vec<(PathBuf, Option<Subset>)> = args
        .caches
        .iter()
        .zip(&caches)
        .map(|(p, c)| (p.clone(), c.manifest().subset))
        .collect();
    let subset = merged_subset(&parts).context("cache-merge")?;
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut dups = Vec::new();
    for (dir, c) in args.caches.iter().zip(&caches) {
        for id in c.utterance_ids() {
            if let Some(other) = seen.insert(id, dir) {
                dups.push(format!("{id} (in {} and {})", other.display(), dir.display()));
            }
        }
    }
    if !dups.is_empty() {
        bail!(
            "cache-merge: {} utterance(s) are in more than one cache:\n  {}",
            dups.len(),
            dups.join("\n  ")
        );
    }

    let created_dir = !out.exists();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let lock = match OutputLock::acquire(out, "wgpu-mlkd cache-merge") {
        Ok(l) => l,
        Err(e) => {
            if created_dir {
                let _ = std::fs::remove_dir(out);
            }
            return Err(e.context("cache-merge"));
        }
    };
    let result = write_merged(out, &args.caches, &caches, &first, subset);
    if result.is_err() {
        // Leave no partial cache: remove what this run wrote (the directory was new or empty).
        if let Ok(entries) = std::fs::read_dir(out) {
            for e in entries.flatten() {
                if cache::is_cache_file(&e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        drop(lock);
        if created_dir {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}

fn write_merged(
    out: &Path,
    dirs: &[PathBuf],
    caches: &[TeacherCache],
    first: &Manifest,
    subset: Option<Subset>,
) -> Result<()> {
    let mut merged = Manifest::new(first.teacher.clone(), first.layers.clone(), first.dtype, subset);
    let mut index = 0;
    for (dir, c) in dirs.iter().zip(caches) {
        let m = c.manifest();
        let mut renumber = BTreeMap::new();
        for s in &m.shards {
            let file = cache::shard_file_name(index);
            copy_durably(&dir.join(&s.file), &out.join(&file))?;
            renumber.insert(s.index, index);
            merged.shards.push(ShardEntry {
                index,
                file,
                ..s.clone()
            });
            index += 1;
        }
        for u in &m.utterances {
            let mut u = u.clone();
            u.shard = renumber[&u.shard];
            merged.utterances.push(u);
        }
        merged.skipped.extend(m.skipped.iter().cloned());
    }
    merged.utterances.sort_by(|a, b| a.id.cmp(&b.id));
    let cached: BTreeSet<&str> = merged.utterances.iter().map(|u| u.id.as_str()).collect();
    merged.skipped.retain(|s| !cached.contains(s.id.as_str()));
    merged.skipped.sort_by(|a, b| a.id.cmp(&b.id));
    cache::sync_dir(out)?;
    merged.write(out)?;
    let r = TeacherCache::open(out)
        .and_then(|c| c.verify())
        .with_context(|| format!("cache-merge: the merged cache {} failed verification", out.display()))?;
    eprintln!(
        "cache-merge: {} caches -> {}: {} utterances in {} shards, {} bytes, verified",
        caches.len(),
        out.display(),
        r.utterances,
        r.shards,
        r.bytes
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_must_cover_the_split_exactly() {
        let p = |s: Option<&str>| (PathBuf::from("c"), s.map(|s| s.parse().unwrap()));
        assert_eq!(merged_subset(&[p(None), p(None)]).unwrap(), None);
        assert_eq!(merged_subset(&[p(Some("1/2")), p(Some("0/2"))]).unwrap(), None);
        let err = |parts: &[(PathBuf, Option<Subset>)]| format!("{:#}", merged_subset(parts).unwrap_err());
        assert!(err(&[p(Some("0/3")), p(Some("1/3"))]).contains("2/3"));
        assert!(err(&[p(Some("0/2")), p(Some("0/2"))]).contains("both"));
        assert!(err(&[p(Some("0/2")), p(Some("1/3"))]).contains("another split"));
        assert!(err(&[p(Some("0/2")), p(None)]).contains("whole"));
    }
}
