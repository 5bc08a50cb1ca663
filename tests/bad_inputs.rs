//! A corpus of bad inputs, generated here (nothing committed), run through every command that reads them:
//! each must exit non-zero with a short message naming the file and the problem, without a panic or a
//! backtrace, and leave no output behind (an existing output untouched). Unusual but valid WAVs (8-bit,
//! 24-bit, float, 8 channels, 8 kHz, 10 MHz) must work. A full file system is tested on a small tmpfs where
//! the test may mount one (root on Linux), and skipped with a message elsewhere.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixture;

/// A fresh folder for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-bad-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary with backtraces enabled, so that a panic or a `{:?}`-printed error would show one.
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("run wgpu-mlkd")
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Asserts a clean refusal: non-zero exit, every needle in stderr (case-insensitive), no panic, no backtrace,
/// a short message. Returns stderr.
#[track_caller]
fn refused(o: &Output, case: &str, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lower = err.to_lowercase();
    assert!(!o.status.success(), "{case}: succeeded but should not:\n{err}");
    assert_eq!(o.status.code(), Some(1), "{case}: exit status {:?}:\n{err}", o.status);
    for bad in ["panicked", "stack backtrace", "rust_backtrace", "stack_backtrace"] {
        assert!(!lower.contains(bad), "{case}: {bad:?} in:\n{err}");
    }
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "{case}: expected {n:?} in:\n{err}");
    }
    assert!(err.lines().count() <= 16, "{case}: message too long:\n{err}");
    eprintln!("{case}: {}", err.trim_end().replace('\n', "\n    "));
    err
}

#[track_caller]
fn succeeded(o: &Output, case: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{case} failed:\n{err}");
    assert!(!err.contains("panicked"), "{case}: {err}");
    err
}

/// Every file under `dir` (recursively, by relative path) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------------------
// Generated WAVs.

/// A canonical 44-byte-header WAV built by hand, for headers no writer would produce.
fn raw_wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits.div_ceil(8);
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&tag.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&rate.wrapping_mul(block as u32).to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&bits.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

fn tone(n: usize, rate: u32) -> Vec<f32> {
    (0..n)
        .map(|i| 0.4 * (2.0 * std::f32::consts::PI * 220.0 * i as f32 / rate as f32).sin())
        .collect()
}

fn pcm16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| ((v * 32767.0) as i16).to_le_bytes()).collect()
}

fn float32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A good 16 kHz 16-bit mono WAV of 0.1 s.
fn good_wav() -> Vec<u8> {
    raw_wav(1, 1, 16000, 16, &pcm16(&tone(1600, 16000)))
}

/// The bad WAVs: file name, bytes, the words the error must contain, and whether the problem is visible in
/// the header (so that `dataset`, which reads headers only, reports it too).
fn bad_wavs() -> Vec<(&'static str, Vec<u8>, &'static [&'static str], bool)> {
    let good = good_wav();
    let mut nan = tone(1600, 16000);
    nan[700] = f32::NAN;
    let mut inf = tone(1600, 16000);
    inf[3] = f32::NEG_INFINITY;
    vec![
        ("empty.wav", Vec::new(), &["empty file"], true),
        ("riff-truncated.wav", good[..20].to_vec(), &["truncated header"], true),
        (
            "data-truncated.wav",
            good[..good.len() - 1001].to_vec(),
            &["truncated", "header says 1600 samples"],
            true,
        ),
        (
            "not-audio.wav",
            b"%PDF-1.4 this is a PDF, not a RIFF file\n".to_vec(),
            &["not a WAV file"],
            true,
        ),
        (
            "float-nan.wav",
            raw_wav(3, 1, 16000, 32, &float32(&nan)),
            &["sample 700", "NaN"],
            false,
        ),
        (
            "float-inf.wav",
            raw_wav(3, 1, 16000, 32, &float32(&inf)),
            &["sample 3", "inf"],
            false,
        ),
        (
            "zero-hz.wav",
            raw_wav(1, 1, 0, 16, &pcm16(&tone(1600, 16000))),
            &["0 Hz"],
            true,
        ),
        (
            "a-law.wav",
            raw_wav(6, 1, 8000, 8, &[0x55; 800]),
            &["unsupported encoding", "A-law"],
            true,
        ),
        (
            "one-sample.wav",
            raw_wav(1, 1, 16000, 16, &pcm16(&[0.5])),
            &["shorter than", "receptive field"],
            false,
        ),
    ]
}

fn teacher() -> PathBuf {
    fixture("base_group")
}

#[test]
fn bad_wavs_are_refused_by_every_command_that_reads_them() {
    let dir = TempDir::new("wavs");
    for (name, bytes, needles, header_level) in bad_wavs() {
        let wav = dir.path(name);
        std::fs::write(&wav, &bytes).unwrap();

        // extract
        let out = dir.path("out.safetensors");
        let o = run(&args(&[
            &"extract",
            &"--teacher",
            &teacher(),
            &"--input",
            &wav,
            &"--out",
            &out,
        ]));
        let mut want = vec![name];
        want.extend_from_slice(needles);
        refused(&o, &format!("extract {name}"), &want);
        assert!(!out.exists(), "extract {name} left {}", out.display());

        // cache-teacher and dataset on a data set of that file and a good one
        let data = dir.path(&format!("data-{name}"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("03a01Wa.wav"), &bytes).unwrap();
        std::fs::write(data.join("03a02Nc.wav"), good_wav()).unwrap();
        let cache = dir.path("cache");
        let o = run(&args(&[
            &"cache-teacher",
            &"--teacher",
            &teacher(),
            &"--data",
            &data,
            &"--out",
            &cache,
        ]));
        let mut want = vec!["03a01Wa.wav"];
        want.extend_from_slice(needles);
        refused(&o, &format!("cache-teacher {name}"), &want);
        assert!(!cache.exists(), "cache-teacher {name} left {}", cache.display());
        if header_level {
            let o = run(&args(&[&"dataset", &data]));
            refused(&o, &format!("dataset {name}"), &want);
        }
    }
}

#[test]
fn unusual_but_valid_wavs_work() {
    let dir = TempDir::new("valid");
    let n16 = 1600;
    let at = |rate: u32| tone(n16 * rate as usize / 16000, rate);
    let u8_data: Vec<u8> = at(16000).iter().map(|v| (v * 127.0 + 128.0) as u8).collect();
    let i24: Vec<u8> = at(16000)
        .iter()
        .flat_map(|v| {
            let b = ((v * 8_388_607.0) as i32).to_le_bytes();
            [b[0], b[1], b[2]]
        })
        .collect();
    let ch8: Vec<u8> = at(16000)
        .iter()
        .flat_map(|&v| (0..8).flat_map(move |c| (((v * (c as f32 + 1.0) / 8.0) * 32767.0) as i16).to_le_bytes()))
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("u8.wav", raw_wav(1, 1, 16000, 8, &u8_data)),
        ("i24.wav", raw_wav(1, 1, 16000, 24, &i24)),
        ("f32.wav", raw_wav(3, 1, 16000, 32, &float32(&at(16000)))),
        ("ch8.wav", raw_wav(1, 8, 16000, 16, &ch8)),
        ("8k.wav", raw_wav(1, 1, 8000, 16, &pcm16(&at(8000)))),
        ("10mhz.wav", raw_wav(1, 1, 10_000_000, 16, &pcm16(&at(10_000_000)))),
    ];
    let data = dir.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let wav = dir.path(name);
        std::fs::write(&wav, bytes).unwrap();
        std::fs::write(data.join(format!("03a0{}Wa.wav", i + 1)), bytes).unwrap();
        let out = dir.path(&format!("{name}.safetensors"));
        let t = std::time::Instant::now();
        let o = run(&args(&[
            &"extract",
            &"--teacher",
            &teacher(),
            &"--input",
            &wav,
            &"--out",
            &out,
        ]));
        succeeded(&o, &format!("extract {name}"));
        let got = common::read_safetensors(&out);
        // 0.1 s at 16 kHz: (1600 - 60) / 40 + 1 = 39 frames whatever the source rate.
        assert_eq!(got["last_hidden_state"].0, vec![39, 32], "{name}");
        assert!(got.values().all(|(_, v)| v.iter().all(|x| x.is_finite())), "{name}");
        eprintln!("extract {name}: ok in {:.2} s", t.elapsed().as_secs_f64());
    }
    let o = run(&args(&[&"dataset", &data]));
    succeeded(&o, "dataset of unusual files");
    let cache = dir.path("cache");
    let o = run(&args(&[
        &"cache-teacher",
        &"--teacher",
        &teacher(),
        &"--data",
        &data,
        &"--out",
        &cache,
    ]));
    succeeded(&o, "cache-teacher of unusual files");
}

// ---------------------------------------------------------------------------------------------------------
// Teacher folders.

/// A copy of the fixture teacher whose config.json text and tensors went through the edits.
fn teacher_copy(dir: &Path, config: impl FnOnce(String) -> String, weights: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let src = teacher();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config(cfg)).unwrap();
    let w = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights(w)).unwrap();
}

/// The fixture's weights with `edit` applied to its tensors (name -> (dtype, shape, bytes)).
fn edit_tensors(
    bytes: Vec<u8>,
    edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut t);
    let views: Vec<_> = t
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

type Edit = Box<dyn FnOnce(String) -> String>;
type WEdit = Box<dyn FnOnce(Vec<u8>) -> Vec<u8>>;

fn bad_teachers() -> Vec<(&'static str, Edit, WEdit, &'static [&'static str])> {
    let same: fn(String) -> String = |s| s;
    let same_w: fn(Vec<u8>) -> Vec<u8> = |w| w;
    const KEY: &str = "encoder.layers.0.attention.q_proj.weight";
    vec![
        (
            "config-malformed",
            Box::new(|s: String| s[..s.len() / 2].to_string()),
            Box::new(same_w),
            &["config.json", "not valid JSON"],
        ),
        (
            "config-missing-fields",
            // Without hidden_size and intermediate_size, transformers' defaults (wav2vec2-base: 768, 3072)
            // apply, which the small checkpoint does not match.
            Box::new(|s: String| {
                let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
                for k in ["hidden_size", "intermediate_size"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v.to_string()
            }),
            Box::new(same_w),
            &["does not match its config.json", "model.safetensors"],
        ),
        (
            "config-heads",
            Box::new(|s: String| s.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5")),
            Box::new(same_w),
            &[
                "config.json",
                "num_attention_heads = 5 does not divide hidden_size = 32",
            ],
        ),
        (
            "config-activation",
            Box::new(|s: String| s.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swish\"")),
            Box::new(same_w),
            &["config.json", "hidden_act", "not supported"],
        ),
        (
            "config-type",
            Box::new(|s: String| s.replace("\"hidden_size\": 32", "\"hidden_size\": \"large\"")),
            Box::new(same_w),
            &["config.json", "invalid field hidden_size"],
        ),
        (
            "config-negative",
            Box::new(|s: String| s.replace("\"hidden_size\": 32", "\"hidden_size\": -32")),
            Box::new(same_w),
            &["config.json", "hidden_size"],
        ),
        (
            "weights-truncated",
            Box::new(same),
            Box::new(|w: Vec<u8>| w[..w.len() - 100].to_vec()),
            &["model.safetensors", "truncated or corrupt"],
        ),
        (
            "weights-header-length",
            Box::new(same),
            Box::new(|mut w: Vec<u8>| {
                w[..8].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
                w
            }),
            &["model.safetensors", "not a valid safetensors file"],
        ),
        (
            "weights-shape",
            Box::new(same),
            Box::new(|w| {
                edit_tensors(w, |t| {
                    let e = t.get_mut(KEY).unwrap();
                    e.1 = vec![e.1[1], e.1[0] / 2, 2];
                })
            }),
            &["model.safetensors", KEY, "shape [32, 16, 2], expected [32, 32]"],
        ),
        (
            "weights-missing",
            Box::new(same),
            Box::new(|w| {
                edit_tensors(w, |t| {
                    t.remove(KEY);
                })
            }),
            &["does not match its config.json", "missing tensor", KEY],
        ),
        (
            "weights-nan",
            Box::new(same),
            Box::new(|w| {
                edit_tensors(w, |t| {
                    t.get_mut(KEY).unwrap().2[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
                })
            }),
            &["model.safetensors", KEY, "non-finite value NaN at element 10"],
        ),
        (
            "weights-int-dtype",
            Box::new(same),
            Box::new(|w| {
                edit_tensors(w, |t| {
                    t.get_mut(KEY).unwrap().0 = safetensors::Dtype::I32;
                })
            }),
            &[
                "model.safetensors",
                KEY,
                "not a floating-point weight type",
                "(1 problem)",
            ],
        ),
    ]
}

#[test]
fn bad_teacher_folders_are_refused_by_extract_and_cache_teacher() {
    let dir = TempDir::new("teachers");
    let wav = dir.path("speech.wav");
    std::fs::write(&wav, good_wav()).unwrap();
    let data = dir.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("03a01Wa.wav"), good_wav()).unwrap();
    for (name, cfg, w, needles) in bad_teachers() {
        let t = dir.path(name);
        teacher_copy(&t, cfg, w);
        let out = dir.path("out.safetensors");
        let o = run(&args(&[&"extract", &"--teacher", &t, &"--input", &wav, &"--out", &out]));
        let mut want = vec![name];
        want.extend_from_slice(needles);
        refused(&o, &format!("extract {name}"), &want);
        assert!(!out.exists(), "extract {name} left {}", out.display());

        let cache = dir.path("cache");
        let o = run(&args(&[
            &"cache-teacher",
            &"--teacher",
            &t,
            &"--data",
            &data,
            &"--out",
            &cache,
        ]));
        refused(&o, &format!("cache-teacher {name}"), &want);
        assert!(!cache.exists(), "cache-teacher {name} left {}", cache.display());

        // An existing empty output directory stays as it was.
        std::fs::create_dir_all(&cache).unwrap();
        let o = run(&args(&[
            &"cache-teacher",
            &"--teacher",
            &t,
            &"--data",
            &data,
            &"--out",
            &cache,
        ]));
        refused(&o, &format!("cache-teacher {name} into an empty dir"), &want);
        assert!(snapshot(&cache).is_empty(), "{name}: {:?}", snapshot(&cache).keys());
        std::fs::remove_dir(&cache).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Caches.

/// A small good cache of the fixture teacher in `out`.
fn make_cache(data: &Path, out: &Path, teacher: &Path) {
    std::fs::create_dir_all(data).unwrap();
    for (i, id) in ["03a01Wa", "03a02Nc"].iter().enumerate() {
        std::fs::write(
            data.join(format!("{id}.wav")),
            raw_wav(1, 1, 16000, 16, &pcm16(&tone(1200 + 400 * i, 16000))),
        )
        .unwrap();
    }
    let o = run(&args(&[
        &"cache-teacher",
        &"--teacher",
        &teacher,
        &"--data",
        &data,
        &"--out",
        &out,
    ]));
    succeeded(&o, "cache-teacher (good cache)");
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_caches_are_refused_by_cache_show_merge_and_teacher() {
    let dir = TempDir::new("caches");
    let data = dir.path("data");
    let good = dir.path("good");
    make_cache(&data, &good, &teacher());

    type MEdit = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, MEdit, &[&str])> = vec![
        (
            "older-format",
            Box::new(|d: &Path| edit_manifest(d, |v| v["version"] = 0.into())),
            &["manifest.json", "cache format version 0", "--force"],
        ),
        (
            "not-json",
            Box::new(|d: &Path| std::fs::write(d.join("manifest.json"), b"{\"format\": \"wgpu-mlkd-te").unwrap()),
            &["manifest.json", "not valid JSON"],
        ),
        (
            "missing-field",
            Box::new(|d: &Path| edit_manifest(d, |v| drop(v.as_object_mut().unwrap().remove("teacher")))),
            &["manifest.json", "malformed manifest", "teacher"],
        ),
        (
            "huge-frames",
            Box::new(|d: &Path| edit_manifest(d, |v| v["utterances"][0]["frames"] = u64::MAX.into())),
            &["shard-00000.safetensors", "manifest says"],
        ),
        (
            "wrong-shard-bytes",
            Box::new(|d: &Path| edit_manifest(d, |v| v["shards"][0]["bytes"] = 12.into())),
            &["shard-00000.safetensors", "the manifest says 12"],
        ),
        (
            "shard-truncated",
            Box::new(|d: &Path| {
                let p = d.join("shard-00000.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            &["shard-00000.safetensors", "bytes, the manifest says"],
        ),
    ];
    for (name, edit, needles) in cases {
        let c = dir.path(name);
        copy_dir(&good, &c);
        edit(&c);
        let before = snapshot(&c);
        for verify in [false, true] {
            let mut a = args(&[&"cache-show", &c]);
            if verify {
                a.push("--verify".into());
            }
            refused(&run(&a), &format!("cache-show {name}"), needles);
        }
        let merged = dir.path("merged");
        let o = run(&args(&[&"cache-merge", &merged, &good, &c]));
        refused(&o, &format!("cache-merge {name}"), needles);
        assert!(!merged.exists(), "cache-merge {name} left {}", merged.display());
        // Resuming it: refused (damaged), the cache untouched.
        let o = run(&args(&[
            &"cache-teacher",
            &"--teacher",
            &teacher(),
            &"--data",
            &data,
            &"--out",
            &c,
        ]));
        refused(&o, &format!("cache-teacher {name}"), &[name]);
        assert!(snapshot(&c) == before, "cache-teacher changed {name}");
    }

    // A cache of another teacher: resuming refuses it as stale, merging refuses the mix.
    let other_teacher = dir.path("other-teacher");
    teacher_copy(
        &other_teacher,
        |s| s.replace("\"layer_norm_eps\": 1e-05", "\"layer_norm_eps\": 2e-05"),
        |w| w,
    );
    let other = dir.path("other");
    make_cache(&dir.path("other-data"), &other, &other_teacher);
    let before = snapshot(&other);
    let o = run(&args(&[
        &"cache-teacher",
        &"--teacher",
        &teacher(),
        &"--data",
        &data,
        &"--out",
        &other,
    ]));
    refused(
        &o,
        "cache-teacher, other teacher",
        &["other", "stale cache", "teacher config.json SHA-256", "--force"],
    );
    assert!(snapshot(&other) == before);
    let merged = dir.path("merged");
    let o = run(&args(&[&"cache-merge", &merged, &good, &other]));
    refused(
        &o,
        "cache-merge, other teacher",
        &["other", "made with other settings", "teacher config.json"],
    );
    assert!(!merged.exists());
}

// ---------------------------------------------------------------------------------------------------------
// Output paths.

#[test]
fn bad_output_paths_are_refused_and_existing_outputs_untouched() {
    let dir = TempDir::new("outputs");
    let wav = dir.path("speech.wav");
    std::fs::write(&wav, good_wav()).unwrap();
    let data = dir.path("data");
    let good = dir.path("good");
    make_cache(&data, &good, &teacher());
    let file = dir.path("a-file");
    std::fs::write(&file, b"precious").unwrap();
    let under_file = file.join("out");
    let existing = dir.path("existing-dir");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("notes.txt"), b"keep me").unwrap();
    let before = snapshot(&dir.0);

    let t = teacher();
    let ex = |out: &Path| run(&args(&[&"extract", &"--teacher", &t, &"--input", &wav, &"--out", &out]));
    refused(
        &ex(&under_file),
        "extract, parent is a file",
        &["a-file", "not a directory"],
    );
    refused(
        &ex(&existing),
        "extract, out is a directory",
        &["existing-dir", "existing directory"],
    );

    let ct = |out: &Path| {
        run(&args(&[
            &"cache-teacher",
            &"--teacher",
            &t,
            &"--data",
            &data,
            &"--out",
            &out,
        ]))
    };
    refused(
        &ct(&under_file),
        "cache-teacher, parent is a file",
        &["a-file", "not a directory"],
    );
    refused(
        &ct(&file),
        "cache-teacher, out is a file",
        &["a-file", "not a directory"],
    );
    refused(
        &ct(&existing),
        "cache-teacher, out holds other files",
        &["existing-dir", "notes.txt", "not part of a teacher cache"],
    );

    let show = |out: &Path| run(&args(&[&"cache-show", &good, &"--id", &"03a01Wa", &"--out", &out]));
    refused(
        &show(&under_file.join("x.safetensors")),
        "cache-show --out, parent is a file",
        &["a-file", "not a directory"],
    );
    refused(
        &show(&existing),
        "cache-show --out, out is a directory",
        &["existing-dir", "existing directory"],
    );

    let merge = |out: &Path| run(&args(&[&"cache-merge", &out, &good]));
    refused(
        &merge(&under_file),
        "cache-merge, parent is a file",
        &["a-file", "not a directory"],
    );
    refused(
        &merge(&file),
        "cache-merge, out is a file",
        &["a-file", "not an empty directory"],
    );
    refused(
        &merge(&existing),
        "cache-merge, out is not empty",
        &["existing-dir", "not an empty directory"],
    );

    assert!(snapshot(&dir.0) == before, "an output was changed or left behind");
}

// ---------------------------------------------------------------------------------------------------------
// A full file system.

/// A tmpfs of `kib` KiB mounted at a fresh folder, unmounted when dropped; None (with a message) where this
/// process may not mount one.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(name: &str, kib: usize) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-tmpfs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .output();
        match o {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                eprintln!(
                    "SKIPPED full-disk test: cannot mount a tmpfs here ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                let _ = std::fs::remove_dir(&dir);
                None
            }
            Err(e) => {
                eprintln!("SKIPPED full-disk test: cannot run mount ({e})");
                let _ = std::fs::remove_dir(&dir);
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_is_a_clear_error_with_nothing_partial_left() {
    #[cfg(not(target_os = "linux"))]
    {
        eprintln!("SKIPPED full-disk test: needs Linux tmpfs");
        return;
    }
    let dir = TempDir::new("full");
    let wav = dir.path("speech.wav");
    // 2 s: extract writes 5 layers x 1599 frames x 32 x 4 bytes = 1 MiB.
    std::fs::write(&wav, raw_wav(1, 1, 16000, 16, &pcm16(&tone(32000, 16000)))).unwrap();
    let Some(fs) = Tmpfs::mount("extract", 256) else { return };
    let out = fs.0.join("speech.safetensors");
    let o = run(&args(&[
        &"extract",
        &"--teacher",
        &teacher(),
        &"--input",
        &wav,
        &"--out",
        &out,
    ]));
    refused(&o, "extract onto a full disk", &["speech.safetensors", "no space left"]);
    assert!(snapshot(&fs.0).is_empty(), "left {:?}", snapshot(&fs.0).keys());

    // cache-teacher: the free-space check passes (told there is plenty), the writes hit ENOSPC.
    let data = dir.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..6 {
        std::fs::write(
            data.join(format!("03a0{i}Wa.wav")),
            raw_wav(1, 1, 16000, 16, &pcm16(&tone(32000, 16000))),
        )
        .unwrap();
    }
    let cache = fs.0.join("cache");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(args(&[
            &"cache-teacher",
            &"--teacher",
            &teacher(),
            &"--data",
            &data,
            &"--out",
            &cache,
            &"--dtype",
            &"f32",
        ]))
        .args(["--max-shard-utterances", "1"])
        .env("WGPU_MLKD_TEST_FREE_BYTES", "1000000000000")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = refused(&o, "cache-teacher onto a full disk", &["no space left", "shard-0000"]);
    let _ = err;
    // Whole shards written before the disk filled stay (the cache resumes); no partial file is left.
    if cache.exists() {
        let left = snapshot(&cache);
        assert!(
            left.keys()
                .all(|k| k == "manifest.json" || (k.starts_with("shard-") && k.ends_with(".safetensors"))),
            "partial files left: {:?}",
            left.keys()
        );
        let o = run(&args(&[&"cache-show", &cache, &"--verify"]));
        succeeded(&o, "cache-show --verify after a full disk");
    }
    // Without the test hook, the real free-space check refuses before computing anything.
    let cache2 = fs.0.join("cache2");
    let o = run(&args(&[
        &"cache-teacher",
        &"--teacher",
        &teacher(),
        &"--data",
        &data,
        &"--out",
        &cache2,
        &"--dtype",
        &"f32",
    ]));
    refused(
        &o,
        "cache-teacher, too little space",
        &["not enough disk space", "cache2"],
    );
    assert!(!cache2.exists(), "left {}", cache2.display());
}
