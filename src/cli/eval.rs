//! `wgpu-mlkd eval`: scores SER models on every utterance of a data set, clean and mixed with each noise type
//! at each SNR (the same seeded mixtures for every model), as WA / UA tables, JSON and a UA-vs-SNR plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::ser_train::{load_noise, resolve_fold};
use super::Cli;
use crate::data::dataset::{Dataset, Utterance};
use crate::model::classifier::SerModel;
use crate::model::upstream::{check_utterance_audio, Upstream};
use crate::model::Wav2Vec2Config;
use crate::train::ser::{self, Scores};
use crate::train::SnrChoice;

#[derive(clap::Args)]
pub struct Args {
    /// SER model folder (from ser-train); repeat to compare models on the same audio
    #[arg(long, value_name = "SER", required = true)]
    ser: Vec<PathBuf>,
    /// Test data: EmoDB or IEMOCAP folder, or a CSV manifest
    #[arg(long, value_name = "DIR|CSV")]
    data: PathBuf,
    /// Noise folders or WAV files (noise type = file stem)
    #[arg(long, value_name = "DIR", num_args = 1..)]
    noise: Vec<PathBuf>,
    /// Built-in noise generators to add: white, pink, brown (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    noise_gen: Vec<String>,
    /// Name noise types by the folder that holds each file instead of the file stem
    #[arg(long)]
    noise_type_from_dir: bool,
    /// Test conditions: `clean` and SNRs in dB (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "clean,0,5,10,20")]
    snr: Vec<SnrChoice>,
    /// Score only these speakers (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "fold")]
    speakers: Vec<String>,
    /// Score only split N (IEMOCAP session N: a split named N, else the N-th split in sorted order)
    #[arg(long, value_name = "N")]
    fold: Option<String>,
    /// Seed of the mixtures (each is seeded by this, the utterance, the noise type and the SNR)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write every result as JSON
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Draw UA against SNR, one line per model and noise type (PNG)
    #[arg(long, value_name = "OUT.png")]
    plot: Option<PathBuf>,
}

/// One row of results.
#[derive(Clone, Debug, Serialize)]
pub struct ResultRow {
    pub model: String,
    /// A noise type, or "clean".
    pub noise: String,
    pub snr: Option<f64>,
    pub wa: f64,
    pub ua: f64,
    pub n: usize,
    pub confusion: Vec<Vec<usize>>,
    pub labels: Vec<String>,
}

/// The mean over noise types at one SNR.
#[derive(Clone, Debug, Serialize)]
pub struct MeanRow {
    pub model: String,
    pub snr: f64,
    pub wa: f64,
    pub ua: f64,
    pub noise_types: usize,
}

fn subset<'a>(ds: &'a Dataset, speakers: &[String], fold: Option<&str>) -> Result<Vec<&'a Utterance>> {
    if let Some(f) = fold {
        let held = resolve_fold(ds, f)?;
        return Ok(ds.fold(&held)?.1);
    }
    if !speakers.is_empty() {
        let known = ds.speakers();
        if let Some(s) = speakers.iter().find(|s| !known.contains(s)) {
            bail!(
                "--speakers: {s:?} is not a speaker of {} (speakers: {})",
                ds.root.display(),
                known.join(", ")
            );
        }
        return Ok(ds.utterances.iter().filter(|u| speakers.contains(&u.speaker)).collect());
    }
    Ok(ds.utterances.iter().collect())
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    for out in args.json.iter().chain(&args.plot) {
        crate::fsutil::check_output_file(out)?;
    }
    // Every model folder is checked before any work.
    let metas = args
        .ser
        .iter()
        .map(|p| SerModel::read_meta(p))
        .collect::<Result<Vec<_>>>()?;
    let ds = Dataset::open(&args.data)?;
    let utts = subset(&ds, &args.speakers, args.fold.as_deref())?;
    if utts.is_empty() {
        bail!("{}: no utterances to score", args.data.display());
    }
    let bank = load_noise(&args.noise, &args.noise_gen, args.noise_type_from_dir, args.seed)?;
    let dbs: Vec<f64> = args
        .snr
        .iter()
        .filter_map(|s| match s {
            SnrChoice::Db(d) => Some(*d),
            SnrChoice::Clean => None,
        })
        .collect();
    let with_clean = args.snr.contains(&SnrChoice::Clean);
    let types = match (&bank, dbs.is_empty()) {
        (Some(b), false) => b.types(),
        (None, false) => bail!("--snr lists dB values but no --noise (or --noise-gen) was given"),
        (_, true) => Vec::new(),
    };
    // The conditions, clean first, then by SNR and noise type.
    let mut conds: Vec<(String, Option<f64>)> = Vec::new();
    if with_clean {
        conds.push(("clean".to_string(), None));
    }
    for &db in &dbs {
        for t in &types {
            conds.push((t.clone(), Some(db)));
        }
    }
    if conds.is_empty() {
        bail!("--snr: nothing to score");
    }

    // Labels are checked for every model before any work.
    let mut truths: Vec<Vec<u32>> = Vec::with_capacity(metas.len());
    for (path, meta) in args.ser.iter().zip(&metas) {
        let class_of: BTreeMap<&str, u32> = meta
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i as u32))
            .collect();
        if let Some(u) = utts.iter().find(|u| !class_of.contains_key(u.label.as_str())) {
            bail!(
                "{}: utterance {} has label {:?}, which the SER model {} does not know (its labels: {})",
                args.data.display(),
                u.id,
                u.label,
                path.display(),
                meta.labels.join(", ")
            );
        }
        truths.push(utts.iter().map(|u| class_of[u.label.as_str()]).collect());
    }
    // Models that share an upstream share its features: each upstream runs once over every utterance and
    // condition (the expensive part), then scores all of its models.
    let mut upstreams: Vec<(String, PathBuf)> = Vec::new();
    let mut upstream_of: Vec<usize> = Vec::with_capacity(metas.len());
    for meta in &metas {
        let dir = meta.upstream_dir()?;
        let key = (meta.upstream.kind.clone(), dir.canonicalize().unwrap_or(dir));
        let index = match upstreams.iter().position(|k| *k == key) {
            Some(i) => i,
            None => {
                upstreams.push(key);
                upstreams.len() - 1
            }
        };
        upstream_of.push(index);
    }

    let gpu = cli.open_gpu()?;
    // Every file is checked against every upstream (from the headers) before any work.
    for (kind, dir) in &upstreams {
        let config = Wav2Vec2Config::from_file(&dir.join("config.json"))?;
        check_utterance_audio(&gpu, &config, &format!("{kind} {}", dir.display()), &utts)?;
    }
    let mut scored: Vec<Option<(Vec<ResultRow>, Vec<MeanRow>)>> = (0..metas.len()).map(|_| None).collect();
    for (up, (_, up_dir)) in upstreams.iter().enumerate() {
        let users: Vec<usize> = (0..metas.len()).filter(|&i| upstream_of[i] == up).collect();
        let first = &metas[users[0]];
        let upstream = Upstream::load_for(&gpu, &first.upstream, up_dir)?;
        let label = format!("{} {}", first.upstream.kind, first.upstream.path);
        let bar = ser::progress_bar((utts.len() * conds.len()) as u64, &format!("features of {label}"));
        // feats[c][i]: condition c, utterance i.
        let mut feats: Vec<Vec<Vec<f32>>> = vec![Vec::with_capacity(utts.len()); conds.len()];
        for u in &utts {
            let clean = crate::data::wav::load_16k(&u.path)?;
            for (c, (noise, snr)) in conds.iter().enumerate() {
                let audio = match (snr, &bank) {
                    (Some(db), Some(b)) => ser::mix_for_eval(&clean, b, args.seed, &u.id, noise, *db)
                        .with_context(|| format!("{}: mixing {noise} at {db} dB", u.path.display()))?,
                    _ => clean.clone(),
                };
                feats[c].push(
                    upstream
                        .pooled(&audio)
                        .with_context(|| format!("{}: upstream features", u.path.display()))?,
                );
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        drop(upstream);
        if users.len() > 1 {
            eprintln!(
                "upstream {label}: features computed once for {} SER models",
                users.len()
            );
        }
        for &i in &users {
            let model_name = args.ser[i].display().to_string();
            let (model, _) = SerModel::load(&gpu, &args.ser[i])?;
            let mut rows = Vec::with_capacity(conds.len());
            for (c, (noise, snr)) in conds.iter().enumerate() {
                let refs: Vec<&[f32]> = feats[c].iter().map(|f| f.as_slice()).collect();
                let pred = ser::argmax_rows(&ser::predict(&gpu, &model, &refs)?);
                let Scores { wa, ua, n, confusion } = ser::score(&truths[i], &pred, model.classes);
                rows.push(ResultRow {
                    model: model_name.clone(),
                    noise: noise.clone(),
                    snr: *snr,
                    wa,
                    ua,
                    n,
                    confusion,
                    labels: metas[i].labels.clone(),
                });
            }
            let means = dbs
                .iter()
                .map(|&db| {
                    let at: Vec<&ResultRow> = rows.iter().filter(|r| r.snr == Some(db)).collect();
                    let k = at.len() as f64;
                    MeanRow {
                        model: model_name.clone(),
                        snr: db,
                        wa: at.iter().map(|r| r.wa).sum::<f64>() / k,
                        ua: at.iter().map(|r| r.ua).sum::<f64>() / k,
                        noise_types: at.len(),
                    }
                })
                .collect();
            scored[i] = Some((rows, means));
        }
    }
    // Tables and results in the order the models were given.
    let mut rows: Vec<ResultRow> = Vec::new();
    let mut means: Vec<MeanRow> = Vec::new();
    for (i, result) in scored.into_iter().enumerate() {
        let (r, m) = result.expect("every model belongs to one upstream group");
        print_table(&args.ser[i].display().to_string(), &metas[i], &r, &m);
        rows.extend(r);
        means.extend(m);
    }
    if let Some(out) = &args.json {
        let json = serde_json::json!({
            "data": args.data.display().to_string(),
            "seed": args.seed,
            "adapter": gpu.adapter().name,
            "results": rows,
            "means": means,
        });
        crate::fsutil::atomic_write(out, serde_json::to_string_pretty(&json)?.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(out) = &args.plot {
        plot(out, &rows)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// One model's table (`rows` and `means` are that model's).
fn print_table(model: &str, meta: &crate::model::classifier::SerMeta, rows: &[ResultRow], means: &[MeanRow]) {
    println!(
        "\n{model} (upstream {} {}, {} classes)",
        meta.upstream.kind,
        meta.upstream.path,
        meta.labels.len()
    );
    println!("{:<24} {:>7} {:>7} {:>6}", "condition", "WA", "UA", "n");
    for r in rows {
        let cond = match r.snr {
            None => r.noise.clone(),
            Some(db) => format!("{} @ {db} dB", r.noise),
        };
        println!("{cond:<24} {:>7.3} {:>7.3} {:>6}", r.wa, r.ua, r.n);
    }
    for m in means {
        let cond = format!("mean of {} @ {} dB", m.noise_types, m.snr);
        println!("{cond:<24} {:>7.3} {:>7.3}", m.wa, m.ua);
    }
}

/// UA against SNR: one line per (model, noise type) and per model the mean over noise types (clean, having no
/// SNR, is in the table and JSON only).
fn plot(out: &Path, rows: &[ResultRow]) -> Result<()> {
    let noisy: Vec<&ResultRow> = rows.iter().filter(|r| r.snr.is_some()).collect();
    if noisy.is_empty() {
        bail!("--plot: no noisy conditions to draw (give --snr with dB values)");
    }
    let mut lines: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    let mut means: BTreeMap<String, BTreeMap<i64, (f64, f64, usize)>> = BTreeMap::new();
    for r in &noisy {
        let snr = r.snr.expect("noisy");
        lines
            .entry((r.model.clone(), r.noise.clone()))
            .or_default()
            .push((snr, r.ua));
        // Keyed by millidecibels so that equal SNRs meet.
        let m = means
            .entry(r.model.clone())
            .or_default()
            .entry((snr * 1000.0).round() as i64)
            .or_insert((snr, 0.0, 0));
        m.1 += r.ua;
        m.2 += 1;
    }
    let mut series = Vec::new();
    for (model, by_snr) in means {
        series.push(crate::plot::Series {
            name: format!("{model}: mean over noise types"),
            points: by_snr
                .into_values()
                .map(|(snr, sum, n)| (snr, sum / n as f64))
                .collect(),
        });
    }
    for ((model, noise), mut points) in lines {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        // The --ser path as given: two models' folders may share their last component.
        series.push(crate::plot::Series {
            name: format!("{model}: {noise}"),
            points,
        });
    }
    crate::plot::write_png(
        out,
        &[crate::plot::Panel {
            title: "unweighted accuracy (UA) against SNR".into(),
            x_label: "SNR (dB)".into(),
            y_label: "UA".into(),
            series,
            markers: true,
        }],
    )
    .with_context(|| format!("--plot {}", out.display()))
}
