//! `wgpu-mlkd dataset`: what a dataset folder or manifest holds, and every file that cannot be used.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::Cli;
use crate::data::dataset::{check_audio, AudioInfo, Dataset, DatasetKind};

#[derive(clap::Args)]
pub struct Args {
    /// Dataset: an EmoDB or IEMOCAP folder (detected), or a CSV manifest path,label,speaker[,split]
    #[arg(value_name = "DIR|CSV")]
    path: PathBuf,
    /// Go on without unreadable or invalid audio files (they are still listed)
    #[arg(long)]
    skip_bad: bool,
}

/// `name count` lines, aligned.
fn counts(title: &str, map: &BTreeMap<String, usize>) {
    println!("{title} ({}):", map.len());
    let w = map.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, n) in map {
        println!("  {k:<w$}  {n}");
    }
}

fn tally<'a>(it: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for k in it {
        *m.entry(k.to_string()).or_insert(0) += 1;
    }
    m
}

fn show_tally<K: std::fmt::Display>(m: &BTreeMap<K, usize>, unit: &str) -> String {
    m.iter()
        .map(|(k, n)| format!("{k}{unit} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn hms(s: f64) -> String {
    let t = s.round() as u64;
    format!("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
}

pub fn run(_cli: &Cli, args: &Args) -> Result<()> {
    let scan = Dataset::scan(&args.path)?;
    let mut ds = scan.dataset;
    let checks = check_audio(&ds);
    let bad: Vec<_> = checks.iter().filter(|c| c.result.is_err()).collect();
    let good: Vec<&AudioInfo> = checks.iter().filter_map(|c| c.result.as_ref().ok()).collect();

    println!("{} dataset at {}", ds.kind, ds.root.display());
    if args.skip_bad {
        ds.drop_bad(&checks);
    }
    println!(
        "utterances: {} ({} labels, {} speakers)",
        ds.utterances.len(),
        ds.labels().len(),
        ds.speakers().len()
    );
    counts("labels", &tally(ds.utterances.iter().map(|u| u.label.as_str())));
    counts("speakers", &tally(ds.utterances.iter().map(|u| u.speaker.as_str())));
    let splits = tally(ds.utterances.iter().filter_map(|u| u.split.as_deref()));
    if splits.is_empty() {
        let why = if ds.kind == DatasetKind::EmoDb {
            " (EmoDB: split by speaker)"
        } else {
            ""
        };
        println!("splits: none{why}");
    } else {
        let without = ds.utterances.iter().filter(|u| u.split.is_none()).count();
        counts("splits", &splits);
        if without > 0 {
            println!("  (no split: {without})");
        }
    }

    let total: f64 = good.iter().map(|i| i.seconds).sum();
    if good.is_empty() {
        println!("audio: no readable files");
    } else {
        let min = good.iter().map(|i| i.seconds).fold(f64::INFINITY, f64::min);
        let max = good.iter().map(|i| i.seconds).fold(0.0, f64::max);
        println!(
            "audio: {} readable files, {total:.1} s ({}) in all; {:.2} s mean, {min:.2} s min, \
             {max:.2} s max",
            good.len(),
            hms(total),
            total / good.len() as f64
        );
        let mut rates = BTreeMap::new();
        let mut chans = BTreeMap::new();
        let mut bits = BTreeMap::new();
        for i in &good {
            *rates.entry(i.sample_rate).or_insert(0) += 1;
            let ch = match i.channels {
                1 => "mono".to_string(),
                2 => "stereo".to_string(),
                n => format!("{n} channels"),
            };
            *chans.entry(ch).or_insert(0) += 1;
            *bits.entry(i.bits).or_insert(0) += 1;
        }
        println!("sample rates: {}", show_tally(&rates, " Hz"));
        println!("channels: {}", show_tally(&chans, ""));
        println!("bits per sample: {}", show_tally(&bits, ""));
    }

    if !scan.dropped.is_empty() {
        let n: usize = scan.dropped.values().sum();
        println!(
            "dropped by the 4-class protocol: {n} utterances: {}",
            show_tally(&scan.dropped, "")
        );
    }
    println!("files not used ({}):", scan.unused.len());
    for u in &scan.unused {
        println!("  {}: {}", u.path.display(), u.reason);
    }
    let list: Vec<String> = bad
        .iter()
        .map(|c| format!("{}: {}", c.path.display(), c.result.as_ref().unwrap_err()))
        .collect();
    let note = if args.skip_bad && !bad.is_empty() {
        ", left out by --skip-bad"
    } else {
        ""
    };
    println!("bad audio files ({}{note}):", bad.len());
    for l in &list {
        println!("  {l}");
    }
    if !bad.is_empty() && !args.skip_bad {
        bail!(
            "{} bad audio files in {}:\n  {}\nfix or remove them, or pass --skip-bad to go on without them",
            bad.len(),
            args.path.display(),
            list.join("\n  ")
        );
    }
    Ok(())
}
