//! The teacher cache end to end, on the tiny fixture teacher (tests/fixtures/base_group, receptive field 60
//! samples) and generated EmoDB-named WAVs: the cache equals `extract` for every utterance; a resumed run
//! (after a simulated crash, `kill -9` or Ctrl-C) is byte-identical to an uninterrupted one; stale, damaged
//! and foreign caches are refused; bad files are listed or skipped; `--shard K/N` parts merge into the same
//! cache; the reader's memory does not grow with the cache.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{bin, fails_with, fixture, fresh_temp, ok, p, read_safetensors, run, stderr};
use wgpu_mlkd::data::cache::{
    CacheDType, Manifest, PlannedUtterance, ShardWriter, TeacherCache, TeacherInfo, UtteranceEntry,
};
use wgpu_mlkd::data::wav;

fn teacher() -> PathBuf {
    fixture("base_group")
}

/// Deterministic speech-like test signal: a few sines and seeded noise.
fn signal(seed: u64, n: usize, rate: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let t = i as f32 / rate as f32;
            let f = 150.0 + 40.0 * seed as f32;
            0.3 * (2.0 * std::f32::consts::PI * f * t).sin()
                + 0.1 * (2.0 * std::f32::consts::PI * 3.1 * f * t).sin()
                + 0.05 * noise
        })
        .collect()
}

/// The good utterances: various lengths and rates (one 22050 Hz, one 8 kHz, one float, one silent, one just
/// long enough for a single frame).
const GOOD: &[(&str, usize, u32, bool)] = &[
    ("03a01Fa", 4000, 16000, false),
    ("03a01Nc", 2400, 16000, true),
    ("03a02Wb", 5000, 22050, false),
    ("08a01Ta", 64, 16000, false),
    ("09a01La", 3000, 16000, false),
    ("10a02Eb", 6400, 16000, false),
    ("11b01Aa", 2000, 8000, false),
];

fn write_good(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, &(id, n, rate, float)) in GOOD.iter().enumerate() {
        let path = dir.join(format!("{id}.wav"));
        let x = if id == "09a01La" {
            vec![0.0; n]
        } else {
            signal(i as u64 + 1, n, rate)
        };
        if float {
            wav::write_wav_f32(&path, &x, rate).unwrap();
        } else {
            wav::write_wav_i16(&path, &x, rate).unwrap();
        }
    }
}

fn good_data(name: &str) -> PathBuf {
    let d = temp(name);
    write_good(&d);
    d
}

fn write_float_wav_raw(path: &Path, x: &[f32], rate: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &v in x {
        w.write_sample(v).unwrap();
    }
    w.finalize().unwrap();
}

fn cache_teacher(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "cache-teacher",
        "--teacher",
        p(&teacher()),
        "--data",
        p(data),
        "--out",
        p(out),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_s(args: &[String]) -> Output {
    bin().args(args).output().expect("run wgpu-mlkd")
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[track_caller]
fn assert_same_dir(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn computed(o: &Output) -> usize {
    let err = stderr(o);
    let at = err.find("computed ").unwrap_or_else(|| panic!("no summary in {err}"));
    err[at + 9..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn cache_equals_extract_for_every_utterance() {
    let data = good_data("eq-data");
    let c32 = temp("eq-f32");
    let c16 = temp("eq-f16");
    let o = ok(run_s(&cache_teacher(
        &data,
        &c32,
        &["--dtype", "f32", "--max-shard-utterances", "3"],
    )));
    assert_eq!(computed(&o), GOOD.len());
    assert!(stderr(&o).contains("estimated cache size"), "{}", stderr(&o));
    ok(run_s(&cache_teacher(&data, &c16, &[])));
    let (a, h) = (TeacherCache::open(&c32).unwrap(), TeacherCache::open(&c16).unwrap());
    // Default layers for the 3-layer teacher: {ceil(3/3), ceil(6/3), 3}.
    assert_eq!(a.layers(), &[1, 2, 3]);
    assert_eq!(a.manifest().shards.len(), 3);
    assert_eq!(h.dtype(), CacheDType::F16);
    assert_eq!(a.utterance_ids().count(), GOOD.len());
    let mut worst = [0f64; 3];
    for &(id, ..) in GOOD {
        let ext = temp(&format!("eq-{id}.safetensors"));
        ok(run(&[
            "extract",
            "--teacher",
            p(&teacher()),
            "--input",
            p(&data.join(format!("{id}.wav"))),
            "--out",
            p(&ext),
            "--layers",
            "1,2,3",
        ]));
        let want = read_safetensors(&ext);
        let frames = want["hidden_states.1"].0[0];
        assert_eq!(a.frames(id), Some(frames), "{id}");
        for (j, l) in [1, 2, 3].into_iter().enumerate() {
            let w = &want[&format!("hidden_states.{l}")].1;
            assert!(w.iter().all(|v| v.is_finite()), "{id}: extract gave non-finite values");
            // f32: bit for bit the same numbers as extract.
            let got = a.targets(id, l).unwrap();
            assert!(
                got.iter().zip(w).all(|(g, w)| g.to_bits() == w.to_bits()) && got.len() == w.len(),
                "{id} layer {l}: f32 cache differs from extract"
            );
            // f16: exactly extract rounded to f16.
            let got = h.targets(id, l).unwrap();
            let max_ref = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let mut max_err = 0f64;
            for (g, w) in got.iter().zip(w) {
                assert_eq!(*g, half::f16::from_f32(*w).to_f32(), "{id} layer {l}");
                max_err = max_err.max((*g as f64 - *w as f64).abs());
            }
            worst[j] = worst[j].max(max_err / max_ref);
        }
        // The export has extract's keys, shapes and values.
        let exp = temp(&format!("eq-{id}-export.safetensors"));
        ok(run(&["cache-show", p(&c32), "--id", id, "--out", p(&exp)]));
        let got = read_safetensors(&exp);
        assert_eq!(got.len(), 3);
        for (key, (shape, data)) in &got {
            assert_eq!(shape, &want[key].0, "{id}/{key}");
            assert_eq!(data, &want[key].1, "{id}/{key}");
        }
    }
    for (j, w) in worst.iter().enumerate() {
        eprintln!(
            "f16 cache vs f32, hidden_states.{}: max |err| / max |ref| = {w:.2e}",
            j + 1
        );
        // Round to nearest f16: relative error at most 2^-11 of each value.
        assert!(*w <= 4.9e-4, "{w}");
    }
    let show = String::from_utf8_lossy(&ok(run(&["cache-show", p(&c16), "--verify"])).stdout).into_owned();
    assert!(
        show.contains("utterances:   7") && show.contains("verified:") && show.contains("f16"),
        "{show}"
    );
    fails_with(
        run(&["cache-show", p(&c16), "--id", "nope", "--out", p(&temp("x.st"))]),
        &["nope"],
    );
}

#[test]
fn resume_after_a_crash_is_identical_to_an_uninterrupted_run() {
    let data = good_data("resume-data");
    let full = temp("resume-full");
    let args = |out: &Path| cache_teacher(&data, out, &["--max-shard-utterances", "2"]);
    ok(run_s(&args(&full)));

    // Simulated crash: one shard renamed but not yet in the manifest, and a half-written temporary file.
    let crashed = temp("resume-crashed");
    let mut a = args(&crashed);
    a.extend(["--stop-after".into(), "1".into()]);
    let o = run_s(&a);
    assert_eq!(o.status.code(), Some(86), "{}", stderr(&o));
    let m = Manifest::read(&crashed).unwrap();
    assert_eq!((m.shards.len(), m.utterances.len()), (1, 2));
    assert_eq!(
        files(&crashed).len(),
        5,
        "manifest, listed shard, unlisted shard, temporary file, the dead process's .lock"
    );
    assert!(crashed.join(".lock").exists());
    let show = String::from_utf8_lossy(&ok(run(&["cache-show", p(&crashed), "--verify"])).stdout).into_owned();
    assert!(show.contains("unlisted"), "{show}");
    let o = ok(run_s(&args(&crashed)));
    assert!(stderr(&o).contains("removed 2 leftover"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no longer running; taking it over"),
        "{}",
        stderr(&o)
    );
    // Finished utterances are not recomputed.
    assert_eq!(computed(&o), GOOD.len() - 2);
    assert_same_dir(&full, &crashed);
    let o = ok(run_s(&args(&crashed)));
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert_same_dir(&full, &crashed);

    // A real kill -9 and a real Ctrl-C, at whatever point they land.
    for signal in ["KILL", "INT"] {
        let out = temp(&format!("resume-{signal}"));
        let mut child = bin()
            .args(args(&out))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Manifest::read(&out).is_ok_and(|m| !m.shards.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        let _ = status;
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        if signal == "INT" && !o.status.success() && o.status.code().is_some() {
            // Ctrl-C finishes the shard in flight, saves it, and says how to continue.
            assert!(err.contains("run the same command again"), "{err}");
        }
        ok(run_s(&args(&out)));
        assert_same_dir(&full, &out);
    }
}

/// `--f16-weights`: the manifest and `cache-show` say so, and the targets stay within the f16-weight bound of
/// the f32 teacher's (1e-3 of the largest value, as `extract --f16`).
#[test]
fn f16_weight_caches_are_recorded_and_close_to_f32() {
    let data = good_data("f16w-data");
    let (c32, c16) = (temp("f16w-f32"), temp("f16w-f16"));
    ok(run_s(&cache_teacher(&data, &c32, &["--dtype", "f32"])));
    let o = run_s(&cache_teacher(&data, &c16, &["--dtype", "f32", "--f16-weights"]));
    if stderr(&o).contains("cannot unpack f16") {
        eprintln!("skipped: this adapter cannot unpack f16 in shaders");
        return;
    }
    ok(o);
    let (a, h) = (TeacherCache::open(&c32).unwrap(), TeacherCache::open(&c16).unwrap());
    assert!(!a.manifest().teacher.f16_weights && h.manifest().teacher.f16_weights);
    let mut worst = 0f64;
    for id in a.utterance_ids() {
        for l in [1, 2, 3] {
            let (x, y) = (a.targets(id, l).unwrap(), h.targets(id, l).unwrap());
            let max_ref = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let err = x
                .iter()
                .zip(&y)
                .fold(0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs()));
            worst = worst.max(err / max_ref);
        }
    }
    eprintln!("f16-weight cache vs f32: max |err| / max |ref| = {worst:.2e}");
    assert!(worst > 0.0 && worst <= 1e-3, "{worst}");
    let show = String::from_utf8_lossy(&ok(run(&["cache-show", p(&c16)])).stdout).into_owned();
    assert!(show.contains("f16 linear weights"), "{show}");
}

#[test]
fn stale_damaged_and_foreign_caches_are_refused() {
    let data = good_data("stale-data");
    let out = temp("stale-cache");
    let args = |extra: &[&str]| {
        let mut a = cache_teacher(&data, &out, &["--max-shard-utterances", "3"]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    ok(run_s(&args(&[])));
    let stale = |extra: &[&str], needle: &str| {
        fails_with(run_s(&args(extra)), &["stale", "--force", needle]);
    };
    stale(&["--layers", "1,3"], "layers");
    stale(&["--dtype", "f32"], "dtype");
    stale(&["--shard", "0/2"], "--shard");
    stale(&["--no-normalize"], "normalisation");
    stale(&["--f16-weights"], "linear weights f32 vs f16");
    let mut other = cache_teacher(&data, &out, &[]);
    other[2] = p(&fixture("stable_layer")).to_string();
    fails_with(run_s(&other), &["stale", "config.json SHA-256"]);

    // Changed and vanished audio.
    let f = data.join("10a02Eb.wav");
    let original = std::fs::read(&f).unwrap();
    wav::write_wav_i16(&f, &signal(99, 6400, 16000), 16000).unwrap();
    fails_with(run_s(&args(&[])), &["stale", "10a02Eb", "audio changed"]);
    std::fs::remove_file(&f).unwrap();
    fails_with(run_s(&args(&[])), &["stale", "10a02Eb", "not in the data set"]);
    std::fs::write(&f, &original).unwrap();
    ok(run_s(&args(&[])));

    // A damaged shard: caught by verify and by a resuming run; a truncated one already by opening.
    let shard = out.join("shard-00001.safetensors");
    let good_bytes = std::fs::read(&shard).unwrap();
    let mut bytes = good_bytes.clone();
    let k = bytes.len() - 10;
    bytes[k] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    fails_with(run(&["cache-show", p(&out), "--verify"]), &["shard-00001", "corrupted"]);
    fails_with(run_s(&args(&[])), &["damaged", "--force", "corrupted"]);
    std::fs::write(&shard, &good_bytes[..good_bytes.len() - 4]).unwrap();
    fails_with(run(&["cache-show", p(&out)]), &["shard-00001", "bytes"]);
    std::fs::remove_file(&shard).unwrap();
    fails_with(run(&["cache-show", p(&out)]), &["shard-00001"]);
    // --force rebuilds.
    ok(run_s(&args(&["--force"])));
    ok(run(&["cache-show", p(&out), "--verify"]));

    // A directory that is not a cache is never touched.
    let foreign = temp("stale-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    fails_with(
        run_s(&cache_teacher(&data, &foreign, &[])),
        &["not part of a teacher cache", "notes.txt"],
    );
    fails_with(run_s(&cache_teacher(&data, &foreign, &["--force"])), &["notes.txt"]);
    assert_eq!(files(&foreign).len(), 1);

    // Not enough disk space: refused before any computation.
    let full = temp("stale-nospace");
    let o = bin()
        .args(cache_teacher(&data, &full, &[]))
        .env("WGPU_MLKD_TEST_FREE_BYTES", "1000")
        .output()
        .unwrap();
    fails_with(o, &["not enough disk space", "nothing was computed"]);
    assert!(!full.exists(), "a failed first run leaves nothing behind");
}

#[test]
fn bad_files_are_all_listed_or_skipped() {
    let data = temp("bad-data");
    write_good(&data);
    for &(id, ..) in &GOOD[2..] {
        std::fs::remove_file(data.join(format!("{id}.wav"))).unwrap();
    }
    wav::write_wav_i16(&data.join("13a01Fa.wav"), &signal(5, 50, 16000), 16000).unwrap();
    let mut nan = signal(6, 2000, 16000);
    nan[123] = f32::NAN;
    write_float_wav_raw(&data.join("13a01Fb.wav"), &nan, 16000);
    std::fs::write(data.join("13a01Fc.wav"), b"").unwrap();
    write_float_wav_raw(&data.join("13a01Fd.wav"), &[], 16000);
    let out = temp("bad-cache");
    let err = fails_with(
        run_s(&cache_teacher(&data, &out, &[])),
        &[
            "4 of 6 files",
            "--skip-bad",
            "13a01Fa.wav: 50 samples",
            "receptive field (60 samples",
            "13a01Fb.wav: sample 123",
            "13a01Fc.wav: empty file",
            "13a01Fd.wav",
        ],
    );
    assert!(!err.contains("03a01Fa"), "{err}");
    assert!(!out.exists(), "a failed first run leaves nothing behind");
    let o = ok(run_s(&cache_teacher(&data, &out, &["--skip-bad"])));
    assert_eq!(computed(&o), 2);
    let c = TeacherCache::open(&out).unwrap();
    assert_eq!(c.utterance_ids().collect::<Vec<_>>(), ["03a01Fa", "03a01Nc"]);
    let skipped: Vec<_> = c.manifest().skipped.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(skipped, ["13a01Fa", "13a01Fb", "13a01Fc", "13a01Fd"]);
    c.verify().unwrap();
}

#[test]
fn shard_parts_merge_into_the_full_cache() {
    let data = good_data("merge-data");
    let full = temp("merge-full");
    ok(run_s(&cache_teacher(&data, &full, &[])));
    let parts: Vec<PathBuf> = (0..3).map(|k| temp(&format!("merge-part{k}"))).collect();
    for (k, part) in parts.iter().enumerate() {
        let spec = format!("{k}/3");
        ok(run_s(&cache_teacher(
            &data,
            part,
            &["--shard", &spec, "--max-shard-utterances", "2"],
        )));
        let ids: Vec<String> = TeacherCache::open(part)
            .unwrap()
            .utterance_ids()
            .map(String::from)
            .collect();
        let want: Vec<&str> = GOOD.iter().skip(k).step_by(3).map(|g| g.0).collect();
        assert_eq!(ids, want);
    }
    let merged = temp("merge-out");
    let o = ok(run(&[
        "cache-merge",
        p(&merged),
        p(&parts[2]),
        p(&parts[0]),
        p(&parts[1]),
    ]));
    assert!(stderr(&o).contains("verified"), "{}", stderr(&o));
    let (a, b) = (TeacherCache::open(&full).unwrap(), TeacherCache::open(&merged).unwrap());
    assert_eq!(b.manifest().subset, None);
    assert_eq!(
        a.utterance_ids().collect::<Vec<_>>(),
        b.utterance_ids().collect::<Vec<_>>()
    );
    for id in a.utterance_ids() {
        for &l in a.layers() {
            assert_eq!(a.targets(id, l).unwrap(), b.targets(id, l).unwrap(), "{id}/{l}");
        }
    }
    ok(run(&["cache-show", p(&merged), "--verify"]));
    // The merged cache is complete for the data set: resuming it finds nothing to do.
    let o = ok(run_s(&cache_teacher(&data, &merged, &[])));
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    fails_with(
        run(&["cache-merge", p(&temp("merge-bad1")), p(&parts[0]), p(&parts[1])]),
        &["2/3", "missing"],
    );
    fails_with(
        run(&["cache-merge", p(&temp("merge-bad2")), p(&full), p(&merged)]),
        &["more than one cache"],
    );
    fails_with(run(&["cache-merge", p(&merged), p(&full)]), &["not an empty directory"]);
}

/// Resident bytes of this process: anonymous memory (`RssAnon`), and the pages of mappings of files under
/// `dir` (from /proc/self/smaps), so that other tests running in this process do not disturb the figures.
#[cfg(target_os = "linux")]
fn resident(dir: &Path) -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |line: &str| line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024;
    let anon = kib(status.lines().find(|l| l.starts_with("RssAnon:")).unwrap());
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut mapped, mut ours) = (0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = line.contains(dir.to_str().unwrap());
        } else if ours && line.starts_with("Rss:") {
            mapped += kib(line);
        }
    }
    (anon, mapped)
}

#[cfg(target_os = "linux")]
#[test]
fn the_reader_maps_the_cache_instead_of_loading_it() {
    // A synthetic 96 MiB cache (no teacher needed): 48 shards of 4 utterances x 2 layers x 1024 frames x 64.
    let dir = temp("memory-cache");
    std::fs::create_dir_all(&dir).unwrap();
    let (d, frames, layers) = (64usize, 1024usize, vec![2usize, 3]);
    let teacher = TeacherInfo {
        config_sha256: "0".repeat(64),
        weights_sha256: "0".repeat(64),
        num_hidden_layers: 3,
        hidden_size: d,
        receptive_field: 400,
        total_stride: 320,
        normalize: true,
        f16_weights: false,
    };
    let mut m = Manifest::new(teacher, layers.clone(), CacheDType::F32, None);
    let values: Vec<f32> = (0..frames * d).map(|i| (i % 1000) as f32 * 1e-3).collect();
    for s in 0..48 {
        let plan: Vec<PlannedUtterance> = (0..4)
            .map(|u| PlannedUtterance {
                id: format!("u{s:03}_{u}"),
                frames,
            })
            .collect();
        let mut w = ShardWriter::create(&dir, s, CacheDType::F32, &layers, d, &plan).unwrap();
        for _ in 0..plan.len() * layers.len() {
            w.write_values(&values).unwrap();
        }
        let offsets = w.offsets().to_vec();
        m.shards.push(w.finish().unwrap());
        for (u, off) in plan.iter().zip(offsets) {
            m.utterances.push(UtteranceEntry {
                id: u.id.clone(),
                audio_sha256: String::new(),
                samples: (frames * 320) as u64,
                frames,
                shard: s,
                offset: off,
            });
        }
    }
    m.write(&dir).unwrap();
    let cache_bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    assert!(cache_bytes > 96 << 20);

    let (anon0, _) = resident(&dir);
    let c = TeacherCache::open(&dir).unwrap();
    let one = c.targets("u017_2", 3).unwrap();
    assert_eq!(one, values);
    let (anon1, mapped1) = resident(&dir);
    eprintln!(
        "open + one utterance: cache pages resident {} KiB, anon +{} KiB, for a {} MiB cache",
        mapped1 >> 10,
        anon1.saturating_sub(anon0) >> 10,
        cache_bytes >> 20
    );
    // Opening and one read allocate nothing that grows with the cache (mapped file pages are page cache
    // the kernel reclaims at will; how many it maps per fault depends on its folio size, so they are shown,
    // not bounded).
    assert!(anon1.saturating_sub(anon0) < 4 << 20);
    assert!(mapped1 < cache_bytes);
    for id in c.utterance_ids() {
        for &l in c.layers() {
            assert_eq!(c.targets(id, l).unwrap().len(), frames * d);
        }
    }
    let (anon2, mapped2) = resident(&dir);
    eprintln!(
        "after reading all {} utterances: cache pages resident {} KiB (reclaimable file pages), anon +{} KiB",
        c.len(),
        mapped2 >> 10,
        anon2.saturating_sub(anon0) >> 10
    );
    // Reading everything maps file pages (reclaimable) but allocates only one utterance at a time.
    assert!(anon2.saturating_sub(anon0) < 24 << 20);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The f16 storage error on a real teacher and real speech, for README (slow on a software GPU; run with
/// `WGPU_MLKD_TEACHER=path/to/wav2vec2-base cargo test --release --test cache f16_error -- --ignored
/// --nocapture`; `WGPU_MLKD_DATA` (default ../shared/data/emodb-dev/wav) and `WGPU_MLKD_N` (default 4) pick
/// the clips). The f16 cache is exactly the f32 one rounded to f16 (checked above), so one f32 run suffices.
#[test]
#[ignore]
fn f16_error_on_a_real_teacher() {
    let Ok(teacher) = std::env::var("WGPU_MLKD_TEACHER") else {
        eprintln!("skipped: set WGPU_MLKD_TEACHER to a wav2vec 2.0 folder");
        return;
    };
    let src = std::env::var("WGPU_MLKD_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/emodb-dev/wav"));
    let Ok(entries) = std::fs::read_dir(&src) else {
        eprintln!("skipped: no data at {}", src.display());
        return;
    };
    let n: usize = std::env::var("WGPU_MLKD_N").map_or(4, |v| v.parse().unwrap());
    let mut wavs: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    wavs.sort();
    let data = temp("f16-data");
    std::fs::create_dir_all(&data).unwrap();
    for w in wavs.iter().take(n) {
        std::fs::copy(w, data.join(w.file_name().unwrap())).unwrap();
    }
    let out = temp("f16-cache");
    let mut args = cache_teacher(&data, &out, &["--dtype", "f32"]);
    args[2] = teacher;
    ok(run_s(&args));
    let c = TeacherCache::open(&out).unwrap();
    for &l in c.layers() {
        let (mut max_err, mut max_ref, mut sum_err, mut sum_ref, mut min_cos, mut rows) =
            (0f64, 0f64, 0f64, 0f64, 1f64, 0);
        for id in c.utterance_ids() {
            let t = c.targets(id, l).unwrap();
            for row in t.chunks(c.hidden_size()) {
                let (mut dot, mut nn, mut hh) = (0f64, 0f64, 0f64);
                for &v in row {
                    let h = half::f16::from_f32(v).to_f32() as f64;
                    let v = v as f64;
                    max_err = max_err.max((h - v).abs());
                    max_ref = max_ref.max(v.abs());
                    sum_err += (h - v).abs();
                    sum_ref += v.abs();
                    dot += h * v;
                    nn += v * v;
                    hh += h * h;
                }
                min_cos = min_cos.min(dot / (nn * hh).sqrt());
                rows += 1;
            }
        }
        eprintln!(
            "hidden_states.{l}: f16 vs f32 over {rows} frames: max |err| / max |ref| = {:.2e} (max |ref| {max_ref:.1}), \
             mean |err| / mean |ref| = {:.2e}, min cosine = 1 - {:.1e}",
            max_err / max_ref,
            sum_err / sum_ref,
            1.0 - min_cos
        );
    }
}

fn temp(name: &str) -> PathBuf {
    fresh_temp("cache", name)
}
