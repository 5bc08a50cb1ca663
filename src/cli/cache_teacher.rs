//! `wgpu-mlkd cache-teacher`: the teacher's target layers for every utterance of a data set, cached once
//! (`crate::data::cache` describes the layout).
//!
//! Order of work: hash the teacher; open or create the cache (refusing a stale one); verify the shards already
//! there; read every audio file once (in parallel) to hash it, validate it and count its frames; print the
//! estimated size and refuse when the disk lacks room; then run the teacher, a shard at a time. A shard is a
//! deterministic group of consecutive utterances (at most `--max-shard-utterances` and about
//! `--max-shard-mb`), so an interrupted run that resumes produces exactly the shards an uninterrupted run
//! does. Each shard's forwards are recorded back to back and read back together (one wait for the GPU per
//! shard); each utterance runs alone, unpadded, so the numbers equal `extract`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};

use super::Cli;
use crate::data::cache::{
    self, default_target_layers, CacheDType, Manifest, PlannedUtterance, ShardWriter, SkippedEntry, Subset,
    TeacherCache, TeacherInfo, UtteranceEntry,
};
use crate::data::dataset::{Dataset, Utterance};
use crate::data::wav;
use crate::fsutil::{human_bytes, is_lock_file, OutputLock};
use crate::gpu::{DType, Tensor};
use crate::model::{teacher_normalizes, Wav2Vec2, Wav2Vec2Config};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face wav2vec 2.0 folder: config.json + model.safetensors (or a sharded index)
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    /// The clean speech: a data set folder (EmoDB, IEMOCAP) or a CSV manifest
    #[arg(long, value_name = "DIR|CSV")]
    data: PathBuf,
    /// Cache directory (created if missing; an existing cache is resumed)
    #[arg(long, value_name = "CACHE")]
    out: PathBuf,
    /// Hidden states to cache, e.g. 4,8,12 (0 = input of layer 1) [default: the method's
    /// ceil(N/3), ceil(2N/3), N for a teacher of N layers]
    #[arg(long)]
    layers: Option<String>,
    /// Stored precision (f16 halves the size; its error against f32 is stated in README)
    #[arg(long, default_value = "f16", value_name = "f16|f32")]
    dtype: CacheDType,
    /// Run the teacher with its linear weights in f16 (as `extract --f16`: less GPU memory, faster on lavapipe;
    /// the targets move by up to about 1e-3 of their largest value; recorded in the manifest)
    #[arg(long)]
    f16_weights: bool,
    /// Leave out files that cannot be cached (listed, and recorded in the manifest) instead of stopping
    #[arg(long)]
    skip_bad: bool,
    /// Delete an existing (stale or damaged) cache in --out and rebuild it
    #[arg(long)]
    force: bool,
    /// Cache only every N-th utterance (in id order) starting at K, to split the work between machines;
    /// join the parts with `cache-merge`
    #[arg(long, value_name = "K/N")]
    shard: Option<Subset>,
    /// Normalise the waveform to zero mean, unit variance (default: the teacher's preprocessor_config.json)
    #[arg(long, overrides_with = "no_normalize")]
    normalize: bool,
    /// Do not normalise the waveform
    #[arg(long, overrides_with = "normalize")]
    no_normalize: bool,
    /// Most utterances per shard file (a shard is the unit of resumption and of reading back)
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_shard_utterances: usize,
    /// Approximate largest shard file in MiB (one longer utterance makes a shard of its own)
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    max_shard_mb: usize,
    /// Test hook: after N shards, leave one more shard unlisted and a partial temporary file, then exit
    /// abruptly (as a crash between the shard and the manifest would)
    #[arg(long, hide = true, value_name = "N")]
    stop_after: Option<usize>,
}

/// Test hook: pretend the cache's file system has this many bytes free.
const FREE_BYTES_ENV: &str = "WGPU_MLKD_TEST_FREE_BYTES";
/// Readbacks of a long utterance go in pieces of at most this many bytes, so host memory stays bounded.
const READBACK_BYTES: usize = 16 << 20;
/// Approximate header bytes per stored tensor (its JSON entry), for the size estimate.
const HEADER_BYTES_PER_TENSOR: u64 = 96;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_: libc::c_int) {
    // A second Ctrl-C leaves at once; the cache stays consistent either way (atomic shard files).
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(130) };
    }
}

/// First Ctrl-C (or SIGTERM): finish the shard in flight, save it, then stop.
fn install_interrupt_handler() {
    #[cfg(unix)]
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// One utterance to cache, after the scan.
struct Item<'a> {
    utt: &'a Utterance,
    sha: String,
    samples: usize,
    frames: usize,
}

/// Reads, hashes and prepares one file exactly as `extract` does (decode, resample to 16 kHz, normalise if
/// the teacher expects it). Too short audio is an error naming the file.
fn load(path: &Path, cfg: &Wav2Vec2Config, normalize: bool) -> Result<(String, Vec<f32>)> {
    let sha = cache::file_sha256(path)?;
    let audio = wav::read_wav(path)?;
    let mut samples = crate::data::resample::resample(&audio.samples, audio.sample_rate, wav::TARGET_RATE);
    if cfg.frames(samples.len()) == 0 {
        bail!(
            "{}: {} samples at 16 kHz ({:.1} ms) is shorter than the teacher's receptive field ({} samples = \
             {:.1} ms)",
            path.display(),
            samples.len(),
            samples.len() as f64 / 16.0,
            cfg.receptive_field(),
            cfg.receptive_field() as f64 / 16.0
        );
    }
    if normalize {
        // Silence normalises to zeros: the variance gets +1e-7 before the square root.
        wav::normalize(&mut samples);
    }
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        bail!("{}: sample {i} is {} after resampling", path.display(), samples[i]);
    }
    Ok((sha, samples))
}

/// Bytes available to us on the file system holding `dir` (None where unknown).
fn free_bytes(dir: &Path) -> Result<Option<u64>> {
    if let Ok(v) = std::env::var(FREE_BYTES_ENV) {
        return Ok(Some(v.parse().with_context(|| format!("{FREE_BYTES_ENV}={v:?}"))?));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: statvfs fills the zeroed struct; `c` is a valid NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(anyhow!("cannot query free space of {}: {e}", dir.display()));
        }
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Ok(Some(st.f_bavail as u64 * st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(None)
    }
}

/// The output directory, locked for this run, and what was there before it (so that a run that fails before
/// caching anything leaves it as it found it).
struct HeldOutput {
    lock: OutputLock,
    created_dir: bool,
    had_manifest: bool,
}

impl HeldOutput {
    /// After a failed run: when this run created the cache and no shard was written, removes what it wrote
    /// (the empty manifest; the directory too if it made it). A cache that holds shards is kept: it resumes.
    fn clean_up_after_failure(self, out: &Path) {
        if self.had_manifest {
            return;
        }
        let empty = match Manifest::read(out) {
            Ok(m) => m.shards.is_empty(),
            Err(_) => !out.join(cache::MANIFEST).exists(),
        };
        if !empty {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(out) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if cache::is_cache_file(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        drop(self.lock);
        if self.created_dir {
            let _ = std::fs::remove_dir(out);
        }
    }
}

/// Creates (if needed) and locks the output directory.
fn hold_output(out: &Path) -> Result<HeldOutput> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    let created_dir = !out.exists();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let lock = match OutputLock::acquire(out, "wgpu-mlkd cache-teacher") {
        Ok(l) => l,
        Err(e) => {
            if created_dir {
                let _ = std::fs::remove_dir(out);
            }
            return Err(e);
        }
    };
    Ok(HeldOutput {
        lock,
        created_dir,
        had_manifest: out.join(cache::MANIFEST).exists(),
    })
}

/// Opens the (locked) cache directory for this run: resumes it, or refuses it as stale or foreign.
fn open_cache_dir(out: &Path, fresh: &Manifest, force: bool) -> Result<Manifest> {
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !cache::is_cache_file(&name) && !is_lock_file(&name) {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        bail!(
            "--out {} holds files that are not part of a teacher cache ({}); choose a new or empty directory",
            out.display(),
            foreign.join(", ")
        );
    }
    let has_manifest = out.join(cache::MANIFEST).exists();
    let existing = if has_manifest && !force {
        let m = Manifest::read(out)
            .with_context(|| format!("{} holds a damaged cache; pass --force to rebuild it", out.display()))?;
        let mut diffs = m.incompatibilities(fresh);
        if m.subset != fresh.subset {
            let show = |s: Option<Subset>| s.map_or("all".to_string(), |s| s.to_string());
            diffs.push(format!("--shard {} vs {}", show(m.subset), show(fresh.subset)));
        }
        if !diffs.is_empty() {
            bail!(
                "{} is a stale cache: it was made with other settings (cache vs this run):\n  {}\npass --force \
                 to delete it and rebuild, or choose another --out",
                out.display(),
                diffs.join("\n  ")
            );
        }
        Some(m)
    } else {
        None
    };
    match existing {
        Some(m) => {
            let removed = cache::remove_leftovers(out, &m)?;
            if removed > 0 {
                eprintln!("cache-teacher: removed {removed} leftover file(s) of an interrupted run");
            }
            Ok(m)
        }
        None => {
            // New, forced, or only leftovers of a run killed before its first manifest: start clean.
            for entry in std::fs::read_dir(out)? {
                let entry = entry?;
                if is_lock_file(&entry.file_name().to_string_lossy()) {
                    continue;
                }
                let path = entry.path();
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
            fresh.write(out)?;
            Ok(fresh.clone())
        }
    }
}

/// A scanned file: its SHA-256 and length in 16 kHz samples (0 for an already cached one), or why it is bad.
type Scanned = Result<(String, usize)>;

/// Reads every selected file once, in parallel: cached ones are only hashed (to detect changed audio), the
/// others are decoded and validated. Returns per utterance its hash and, when not cached, its length or error.
fn scan(
    utts: &[&Utterance],
    cached: &HashMap<&str, &UtteranceEntry>,
    cfg: &Wav2Vec2Config,
    normalize: bool,
) -> Vec<Scanned> {
    let results: Vec<Mutex<Option<Scanned>>> = utts.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(u) = utts.get(i) else { break };
                let r = if cached.contains_key(u.id.as_str()) {
                    cache::file_sha256(&u.path).map(|sha| (sha, 0))
                } else {
                    load(&u.path, cfg, normalize).map(|(sha, s)| (sha, s.len()))
                };
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every item scanned")
        })
        .collect()
}

/// Consecutive groups of items: a new shard starts when the current one has `max_utts` items or the next
/// item would take it past `max_bytes`. Depends only on the items, so a resumed run plans what remains
/// exactly as the uninterrupted run did.
fn plan_shards(bytes: &[u64], max_utts: usize, max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut acc) = (0, 0u64);
    for (i, &b) in bytes.iter().enumerate() {
        if i > start && (i - start >= max_utts || acc + b > max_bytes) {
            out.push(start..i);
            (start, acc) = (i, 0);
        }
        acc += b;
    }
    if start < bytes.len() {
        out.push(start..bytes.len());
    }
    out
}

/// Reads a `[1, T, D]` tensor back in pieces of at most `rows` rows (so that a very long utterance never
/// needs its whole output in host memory), handing each piece to `sink` in order.
fn read_back_rows(t: &Tensor, rows: usize, mut sink: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
    let (frames, d) = (t.shape()[1], t.shape()[2]);
    if frames <= rows {
        return sink(&t.to_vec()?);
    }
    for row0 in (0..frames).step_by(rows) {
        let n = rows.min(frames - row0);
        let part = Tensor::empty(t.gpu(), &[n * d], DType::F32)?;
        part.copy_from(0, t, row0 * d, n * d)?;
        sink(&part.to_vec()?)?;
    }
    Ok(())
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let mut held = None;
    let result = run_locked(cli, args, &mut held);
    if let (Err(_), Some(h)) = (&result, held) {
        h.clean_up_after_failure(&args.out);
    }
    result
}

fn run_locked(cli: &Cli, args: &Args, held: &mut Option<HeldOutput>) -> Result<()> {
    if args.max_shard_utterances == 0 || args.max_shard_mb == 0 {
        bail!("--max-shard-utterances and --max-shard-mb must be at least 1");
    }
    let normalize = match (args.normalize, args.no_normalize) {
        (true, _) => true,
        (_, true) => false,
        _ => teacher_normalizes(&args.teacher)?,
    };
    let (mut teacher, cfg) = TeacherInfo::from_dir(&args.teacher, normalize)?;
    teacher.f16_weights = args.f16_weights;
    let n_layers = cfg.num_hidden_layers;
    let mut layers = match &args.layers {
        Some(spec) => super::extract::parse_layers(spec, n_layers)?,
        None => default_target_layers(n_layers),
    };
    layers.sort_unstable();
    let data = Dataset::open(&args.data)?;
    let selected: Vec<&Utterance> = data
        .utterances
        .iter()
        .enumerate()
        .filter(|(i, _)| args.shard.is_none_or(|s| s.contains(*i)))
        .map(|(_, u)| u)
        .collect();
    if let Some(w) = data.utterances.windows(2).find(|w| w[0].id == w[1].id) {
        bail!(
            "{}: utterance id {} occurs twice ({} and {}); ids must be unique",
            args.data.display(),
            w[0].id,
            w[0].path.display(),
            w[1].path.display()
        );
    }
    let fresh = Manifest::new(teacher, layers, args.dtype, args.shard);
    *held = Some(hold_output(&args.out)?);
    let mut manifest = open_cache_dir(&args.out, &fresh, args.force)?;
    if !manifest.shards.is_empty() {
        TeacherCache::open(&args.out)
            .and_then(|c| c.verify())
            .with_context(|| {
                format!(
                    "the cache in {} is damaged; pass --force to rebuild it",
                    args.out.display()
                )
            })?;
    }

    // Scan: hash, validate and measure every selected file; detect changed or vanished audio.
    let cached: HashMap<&str, &UtteranceEntry> = manifest.utterances.iter().map(|u| (u.id.as_str(), u)).collect();
    let t_scan = Instant::now();
    let scanned = scan(&selected, &cached, &cfg, normalize);
    let mut stale = Vec::new();
    let mut bad = Vec::new();
    let mut todo = Vec::new();
    for (u, r) in selected.iter().zip(scanned) {
        match (r, cached.get(u.id.as_str())) {
            (Ok((sha, _)), Some(c)) if sha != c.audio_sha256 => stale.push(format!(
                "{} ({}): audio changed since it was cached",
                u.id,
                u.path.display()
            )),
            (Ok(_), Some(_)) => {}
            (Ok((sha, samples)), None) => todo.push(Item {
                utt: u,
                sha,
                samples,
                frames: cfg.frames(samples),
            }),
            (Err(e), Some(_)) => stale.push(format!("{}: {e:#}", u.id)),
            (Err(e), None) => bad.push((u, format!("{e:#}"))),
        }
    }
    let selected_ids: std::collections::HashSet<&str> = selected.iter().map(|u| u.id.as_str()).collect();
    for u in &manifest.utterances {
        if !selected_ids.contains(u.id.as_str()) {
            stale.push(format!(
                "{}: cached, but not in the data set {}",
                u.id,
                args.data.display()
            ));
        }
    }
    if !stale.is_empty() {
        bail!(
            "{} is a stale cache: {} cached utterance(s) no longer match the data:\n  {}\npass --force to \
             delete it and rebuild, or choose another --out",
            args.out.display(),
            stale.len(),
            stale.join("\n  ")
        );
    }
    if !bad.is_empty() {
        let list: Vec<String> = bad.iter().map(|(_, e)| e.clone()).collect();
        if !args.skip_bad {
            bail!(
                "{} of {} files cannot be cached (nothing was computed; fix them, or pass --skip-bad to leave \
                 them out):\n  {}",
                bad.len(),
                selected.len(),
                list.join("\n  ")
            );
        }
        eprintln!(
            "cache-teacher: leaving out {} bad file(s) (--skip-bad):\n  {}",
            bad.len(),
            list.join("\n  ")
        );
    }
    manifest.skipped = bad
        .iter()
        .map(|(u, e)| SkippedEntry {
            id: u.id.clone(),
            error: e.clone(),
        })
        .collect();

    // Size estimate and free space.
    let per_frame = manifest.bytes_per_frame() as u64;
    let utt_bytes = |frames: usize| frames as u64 * per_frame + manifest.layers.len() as u64 * HEADER_BYTES_PER_TENSOR;
    let cached_bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    let todo_bytes: Vec<u64> = todo.iter().map(|it| utt_bytes(it.frames)).collect();
    let todo_total: u64 = todo_bytes.iter().sum();
    let todo_samples: u64 = todo.iter().map(|it| it.samples as u64).sum();
    let free = free_bytes(&args.out)?;
    eprintln!(
        "cache-teacher: {} utterances{} ({} already cached, {} to compute, {:.1} s of audio; scanned in {:.1} s), \
         layers {:?} as {}: estimated cache size {}, {} to write{}",
        selected.len() - bad.len(),
        args.shard.map_or(String::new(), |s| format!(" in shard {s}")),
        manifest.utterances.len(),
        todo.len(),
        todo_samples as f64 / 16000.0,
        t_scan.elapsed().as_secs_f64(),
        manifest.layers,
        manifest.dtype,
        human_bytes(cached_bytes + todo_total),
        human_bytes(todo_total),
        free.map_or(String::new(), |f| format!(", {} free", human_bytes(f)))
    );
    let max_shard_bytes = (args.max_shard_mb as u64) << 20;
    if let Some(free) = free {
        // Room for the rest, plus one shard's temporary file over an orphan of the same name, plus slack.
        let need = todo_total + todo_total.min(max_shard_bytes) + (1 << 20);
        if todo_total > 0 && free < need {
            bail!(
                "not enough disk space for the cache in {}: about {} more is needed, {} is free; free some \
                 space or choose another --out (nothing was computed)",
                args.out.display(),
                human_bytes(need),
                human_bytes(free)
            );
        }
    }
    manifest.write(&args.out)?;
    if todo.is_empty() {
        eprintln!(
            "cache-teacher: nothing to do: all {} utterances are cached in {}",
            manifest.utterances.len(),
            args.out.display()
        );
        return Ok(());
    }

    let gpu = cli.open_gpu()?;
    let mut model = Wav2Vec2::load(&gpu, &args.teacher)?;
    // Refuse files the teacher cannot take in one piece before computing anything (the forward would refuse
    // them one by one, hours into a run).
    let max = model.max_samples();
    let too_long: Vec<String> = todo
        .iter()
        .filter(|it| it.samples > max)
        .map(|it| format!("{}: {:.1} s", it.utt.path.display(), it.samples as f64 / 16000.0))
        .collect();
    if !too_long.is_empty() {
        bail!(
            "{} file(s) are longer than this GPU lets the teacher take in one piece ({max} samples = {:.1} s, set \
             by its largest storage binding); nothing was computed; split them into shorter utterances:\n  {}",
            too_long.len(),
            max as f64 / 16000.0,
            too_long.join("\n  ")
        );
    }
    model.freeze_with(args.f16_weights)?;
    install_interrupt_handler();
    let plan = plan_shards(&todo_bytes, args.max_shard_utterances, max_shard_bytes);
    let progress = indicatif::ProgressBar::new(todo_samples);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta_precise} | {msg}",
        )
        .expect("valid template"),
    );
    let started = Instant::now();
    let mut done_utts = 0usize;
    let mut done_samples = 0u64;
    let mut done_frames = 0u64;
    let mut written_shards = 0usize;
    let mut next_index = manifest.shards.iter().map(|s| s.index + 1).max().unwrap_or(0);
    let d = cfg.hidden_size;
    let rows_per_read = (READBACK_BYTES / (d * 4)).max(1);

    let result = std::thread::scope(|s| -> Result<()> {
        // A reader thread decodes ahead (bounded queue) while the GPU works.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(String, Vec<f32>)>>(4);
        let todo_ref = &todo;
        let cfg_ref = &cfg;
        s.spawn(move || {
            for it in todo_ref {
                if tx.send(load(&it.utt.path, cfg_ref, normalize)).is_err() {
                    break;
                }
            }
        });
        for (n, range) in plan.iter().enumerate() {
            let items = &todo[range.clone()];
            // Record every forward of the shard; nothing runs until the first readback.
            let mut outputs = Vec::with_capacity(items.len());
            for it in items {
                let (sha, samples) = rx.recv().map_err(|_| anyhow!("audio reader stopped"))??;
                if sha != it.sha {
                    bail!("{}: the file changed while caching; run again", it.utt.path.display());
                }
                let out = model
                    .forward(&samples)
                    .with_context(|| format!("running the teacher on {}", it.utt.path.display()))?;
                let kept: Vec<Tensor> = manifest.layers.iter().map(|&l| out.hidden_states[l].clone()).collect();
                if kept[0].shape() != [1, it.frames, d] {
                    bail!(
                        "{}: the teacher gave {:?}, expected [1, {}, {d}]",
                        it.utt.path.display(),
                        kept[0].shape(),
                        it.frames
                    );
                }
                outputs.push(kept);
            }
            let planned: Vec<PlannedUtterance> = items
                .iter()
                .map(|it| PlannedUtterance {
                    id: it.utt.id.clone(),
                    frames: it.frames,
                })
                .collect();
            let mut writer = ShardWriter::create(&args.out, next_index, manifest.dtype, &manifest.layers, d, &planned)?;
            for (it, kept) in items.iter().zip(outputs) {
                for t in &kept {
                    read_back_rows(t, rows_per_read, |v| writer.write_values(v))
                        .with_context(|| format!("{}", it.utt.path.display()))?;
                }
                done_utts += 1;
                done_samples += it.samples as u64;
                done_frames += it.frames as u64;
                progress.set_position(done_samples);
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                progress.set_message(format!(
                    "{done_utts}/{} utt, {:.1} utt/s, {:.1} audio s/s",
                    todo.len(),
                    done_utts as f64 / secs,
                    done_samples as f64 / 16000.0 / secs
                ));
            }
            let offsets = writer.offsets().to_vec();
            let entry = writer.finish()?;
            if args.stop_after == Some(n) {
                // Crash simulation: this shard is in place but unlisted, the next one half written.
                let tmp = args.out.join(format!(
                    ".{}.{}.tmp",
                    cache::shard_file_name(next_index + 1),
                    std::process::id()
                ));
                std::fs::write(&tmp, b"partial shard")?;
                progress.abandon();
                eprintln!("cache-teacher: stopping abruptly after {n} listed shards (--stop-after)");
                std::process::exit(86);
            }
            for (it, offset) in items.iter().zip(offsets) {
                manifest.utterances.push(UtteranceEntry {
                    id: it.utt.id.clone(),
                    audio_sha256: it.sha.clone(),
                    samples: it.samples as u64,
                    frames: it.frames,
                    shard: next_index,
                    offset,
                });
            }
            manifest.shards.push(entry);
            manifest.write(&args.out)?;
            next_index += 1;
            written_shards += 1;
            if INTERRUPTED.load(Ordering::SeqCst) && n + 1 < plan.len() {
                progress.abandon();
                bail!(
                    "interrupted: {} utterances in {} shards are saved in {}; run the same command again to \
                     continue",
                    manifest.utterances.len(),
                    manifest.shards.len(),
                    args.out.display()
                );
            }
        }
        Ok(())
    });
    if result.is_err() {
        progress.abandon();
    }
    result?;
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let total_bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    let all_frames: u64 = manifest.utterances.iter().map(|u| u.frames as u64).sum();
    eprintln!(
        "cache-teacher: computed {done_utts} utterances ({:.1} s of audio, {done_frames} frames) into {written_shards} \
         shards in {secs:.1} s: {:.2} utt/s, {:.1} audio s/s (adapter: {})\ncache {}: {} utterances, {all_frames} \
         frames, {} shards, {}{}",
        done_samples as f64 / 16000.0,
        done_utts as f64 / secs.max(1e-9),
        done_samples as f64 / 16000.0 / secs.max(1e-9),
        gpu.adapter().name,
        args.out.display(),
        manifest.utterances.len(),
        manifest.shards.len(),
        human_bytes(total_bytes),
        if manifest.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} bad files left out", manifest.skipped.len())
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{plan_shards, read_back_rows};
    use crate::gpu::{test_gpu, Tensor};

    #[test]
    fn long_outputs_are_read_back_in_pieces() {
        let (t, d) = (37, 5);
        let data: Vec<f32> = (0..t * d).map(|i| i as f32 * 0.5).collect();
        let x = Tensor::from_slice(test_gpu(), &data, &[1, t, d]).unwrap();
        for rows in [1, 8, 36, 37, 100] {
            let (mut got, mut pieces) = (Vec::new(), 0);
            read_back_rows(&x, rows, |v| {
                assert!(v.len() <= rows * d);
                got.extend_from_slice(v);
                pieces += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(
                (got.as_slice(), pieces),
                (data.as_slice(), t.div_ceil(rows)),
                "{rows} rows"
            );
        }
    }

    #[test]
    fn shard_plans_are_greedy_and_resume_identically() {
        let bytes = [10, 10, 10, 50, 5, 5, 5, 5, 100, 1];
        let plan = plan_shards(&bytes, 3, 30);
        assert_eq!(plan, vec![0..3, 3..4, 4..7, 7..8, 8..9, 9..10]);
        // Resuming after any whole shard plans the rest exactly as before.
        for cut in &plan {
            let rest: Vec<_> = plan_shards(&bytes[cut.start..], 3, 30)
                .into_iter()
                .map(|r| r.start + cut.start..r.end + cut.start)
                .collect();
            assert_eq!(
                rest,
                plan.iter()
                    .filter(|r| r.start >= cut.start)
                    .cloned()
                    .collect::<Vec<_>>()
            );
        }
    }
}
