//! Seeded mutation fuzzing of every parser of untrusted files: the WAV reader (and the dataset's header
//! check), config.json, safetensors checkpoints and the teacher cache (manifest and shards). Inputs are
//! truncated at every length of their headers and at random lengths, bit-flipped, have length fields set to
//! huge or sign-bit values, ranges deleted or duplicated, and JSON values replaced by values of the wrong
//! type or range. Every case must return (Ok or an Err with a message), never panic. Deterministic: a
//! failure names the case's seed and index; inputs that once broke something are kept as explicit cases
//! at the end (with a comment saying what they broke).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_mlkd::data::cache::{
    CacheDType, Manifest, PlannedUtterance, ShardWriter, TeacherCache, TeacherInfo, UtteranceEntry,
};
use wgpu_mlkd::data::{dataset, wav};
use wgpu_mlkd::model::weights::Checkpoint;
use wgpu_mlkd::model::Wav2Vec2Config;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-fuzz-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f`, failing the test with `what` if it panics.
#[track_caller]
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked: {msg}");
        }
    }
}

/// An Err must say something.
#[track_caller]
fn check_err<T>(what: &str, r: &anyhow::Result<T>) {
    if let Err(e) = r {
        let msg = format!("{e:#}");
        assert!(msg.len() >= 8, "{what}: uninformative error {msg:?}");
    }
}

const HUGE_U32: [u32; 7] = [0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFF0, 12345];
const HUGE_U64: [u64; 6] = [0, 1, 1 << 31, 1 << 40, u64::MAX, u64::MAX - 7];

/// One to three random mutations of `b`.
fn mutate(rng: &mut StdRng, b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    for _ in 0..rng.gen_range(1..=3) {
        let len = v.len();
        match rng.gen_range(0..7) {
            0 => v.truncate(rng.gen_range(0..=len)),
            1 => {
                for _ in 0..rng.gen_range(1..=8) {
                    if !v.is_empty() {
                        let i = rng.gen_range(0..v.len());
                        v[i] ^= 1 << rng.gen_range(0..8);
                    }
                }
            }
            2 if len >= 4 => {
                // Mostly in the header, where the length fields are.
                let i = rng.gen_range(0..=(len - 4).min(64));
                let x = HUGE_U32[rng.gen_range(0..HUGE_U32.len())];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 if len >= 8 => {
                let i = if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen_range(0..=len - 8)
                };
                let x = HUGE_U64[rng.gen_range(0..HUGE_U64.len())];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            4 if len > 0 => {
                let a = rng.gen_range(0..len);
                let e = (a + rng.gen_range(1..=64)).min(len);
                v.drain(a..e);
            }
            5 if len > 0 => {
                let a = rng.gen_range(0..len);
                let e = (a + rng.gen_range(1..=64)).min(len);
                let copy = v[a..e].to_vec();
                let at = rng.gen_range(0..=len);
                v.splice(at..at, copy);
            }
            _ => {
                let at = rng.gen_range(0..=len);
                let junk: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
                v.splice(at..at, junk);
            }
        }
    }
    v
}

/// JSON values of every wrong type and range.
fn weird_values() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!(null),
        json!(-1),
        json!(0),
        json!(1),
        json!(3),
        json!(1.5),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("x"),
        json!(""),
        json!([]),
        json!([0]),
        json!([1, 2, 3]),
        json!({}),
        json!(true),
    ]
}

/// Every leaf (and every array/object) of `v`, as JSON pointers.
fn pointers(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

/// Every single-value replacement (and removal) of `base`, as text.
fn json_variants(base: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(base).unwrap();
    let mut ptrs = Vec::new();
    pointers(&v, String::new(), &mut ptrs);
    let mut out = Vec::new();
    for p in &ptrs {
        for w in weird_values() {
            let mut x = v.clone();
            *x.pointer_mut(p).unwrap() = w;
            out.push(x.to_string());
        }
        // Removal of an object key.
        if let Some((parent, key)) = p.rsplit_once('/') {
            let mut x = v.clone();
            if let Some(obj) = x.pointer_mut(parent).and_then(|o| o.as_object_mut()) {
                obj.remove(&key.replace("~1", "/").replace("~0", "~"));
                out.push(x.to_string());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------

fn wav_bases(dir: &Path) -> Vec<Vec<u8>> {
    let x: Vec<f32> = (0..200).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
    let mut out = Vec::new();
    for (ch, rate, bits, float) in [
        (1u16, 16000, 16, false),
        (2, 44100, 32, true),
        (1, 8000, 24, false),
        (3, 22050, 8, false),
    ] {
        let p = dir.join("base.wav");
        let spec = hound::WavSpec {
            channels: ch,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        };
        let mut w = hound::WavWriter::create(&p, spec).unwrap();
        for (i, &v) in x.iter().enumerate().take(60 * ch as usize) {
            let _ = i;
            if float {
                w.write_sample(v).unwrap();
            } else {
                w.write_sample((v * ((1i64 << (bits - 1)) - 1) as f32) as i32).unwrap();
            }
        }
        w.finalize().unwrap();
        out.push(std::fs::read(&p).unwrap());
    }
    out
}

fn try_wav(path: &Path, bytes: &[u8], what: &str) {
    std::fs::write(path, bytes).unwrap();
    let r = no_panic(what, || wav::read_wav(path));
    check_err(what, &r);
    if let Err(e) = &r {
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&path.display().to_string()),
            "{what}: the path is not named: {msg}"
        );
    }
    let h = no_panic(what, || dataset::check_file(path));
    if let Err(e) = &h {
        assert!(!e.is_empty(), "{what}: empty header error");
    }
    // Whatever passes the reader resamples without trouble.
    if let Ok(a) = r {
        no_panic(what, || {
            wgpu_mlkd::data::resample::resample(&a.samples, a.sample_rate, 16000)
        });
    }
}

#[test]
fn fuzz_wav_reader() {
    let dir = TempDir::new("wav");
    let path = dir.0.join("case.wav");
    let t = Instant::now();
    let mut n = 0;
    for (b, base) in wav_bases(&dir.0).iter().enumerate() {
        for len in 0..base.len().min(80) {
            try_wav(&path, &base[..len], &format!("wav base {b} truncated to {len}"));
            n += 1;
        }
        let mut rng = StdRng::seed_from_u64(100 + b as u64);
        for i in 0..500 {
            let m = mutate(&mut rng, base);
            try_wav(&path, &m, &format!("wav base {b} mutation {i} (seed {})", 100 + b));
            n += 1;
        }
    }
    eprintln!("{n} WAV cases in {:.2} s", t.elapsed().as_secs_f64());
}

fn try_config(text: &str, what: &str) {
    let r = no_panic(what, || Wav2Vec2Config::from_json(text));
    check_err(what, &r);
    if let Ok(c) = r {
        // Derived sizes of an accepted config must not overflow.
        no_panic(what, || (c.receptive_field(), c.frames(16000), c.total_stride()));
    }
}

#[test]
fn fuzz_config() {
    let base = std::fs::read_to_string(common::fixture("base_group").join("config.json")).unwrap();
    let t = Instant::now();
    let variants = json_variants(&base);
    for (i, v) in variants.iter().enumerate() {
        try_config(v, &format!("config variant {i}: {v}"));
    }
    let mut rng = StdRng::seed_from_u64(200);
    for i in 0..1000 {
        let m = mutate(&mut rng, base.as_bytes());
        try_config(&String::from_utf8_lossy(&m), &format!("config mutation {i} (seed 200)"));
    }
    eprintln!(
        "{} config cases in {:.2} s",
        variants.len() + 1000,
        t.elapsed().as_secs_f64()
    );
}

fn try_checkpoint(dir: &Path, bytes: &[u8], what: &str) {
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let r = no_panic(what, || Checkpoint::open(dir));
    check_err(what, &r);
    if let Ok(mut ck) = r {
        no_panic(what, || {
            // A take of a real name with a wrong shape, then finish: every tensor is reported.
            let _ = ck.take("encoder.layer_norm.weight", &[32]);
            let _ = ck.take("feature_projection.projection.weight", &[usize::MAX / 2, 3]);
            let e = ck.finish();
            check_err(what, &e);
        });
    }
}

#[test]
fn fuzz_safetensors_checkpoint() {
    let dir = TempDir::new("st");
    let base = std::fs::read(common::fixture("base_group").join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let t = Instant::now();
    let mut n = 0;
    for len in (0..header.min(200)).chain([header, header + 1, base.len() - 1]) {
        try_checkpoint(&dir.0, &base[..len], &format!("safetensors truncated to {len}"));
        n += 1;
    }
    let mut rng = StdRng::seed_from_u64(300);
    for i in 0..200 {
        // Mutate the header (where the structure is) and keep the data.
        let mut m = mutate(&mut rng, &base[..header]);
        if rng.gen_bool(0.7) {
            m.extend_from_slice(&base[header..]);
        }
        try_checkpoint(&dir.0, &m, &format!("safetensors mutation {i} (seed 300)"));
        n += 1;
    }
    // JSON replacements inside the header.
    let json = std::str::from_utf8(&base[8..header]).unwrap().trim_end();
    let variants = json_variants(json);
    for (i, v) in variants.iter().enumerate().step_by(16) {
        let mut m = (v.len() as u64).to_le_bytes().to_vec();
        m.extend_from_slice(v.as_bytes());
        m.extend_from_slice(&base[header..]);
        try_checkpoint(&dir.0, &m, &format!("safetensors header variant {i}: {v:.200}"));
        n += 1;
    }
    eprintln!("{n} safetensors cases in {:.2} s", t.elapsed().as_secs_f64());
}

/// Regression: a config.json with an absurd size passed validation, and loading then asked for a
/// `vec![0.0; hidden * hidden]` of 10^24 elements ("capacity overflow" panic, or an abort out of memory);
/// `Checkpoint::take` with such a shape panicked the same way. Both are errors now.
#[test]
fn absurd_sizes_are_errors_not_allocations() {
    let base = std::fs::read_to_string(common::fixture("base_group").join("config.json")).unwrap();
    for (from, to) in [
        ("\"hidden_size\": 32", "\"hidden_size\": 1000000000000"),
        (
            "\"intermediate_size\": 64",
            "\"intermediate_size\": 4611686018427387904",
        ),
        ("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 100000000"),
    ] {
        let text = base.replace(from, to);
        let err = format!("{:#}", Wav2Vec2Config::from_json(&text).unwrap_err());
        assert!(err.contains("beyond what this program supports"), "{err}");
    }
    // conv_stride of 4096 in 7 layers: the receptive field would overflow usize.
    let text = base.replace(
        "\"conv_stride\": [\n    5,\n    2,\n    2,\n    2\n  ]",
        "\"conv_stride\": [4096, 4096, 4096, 4096]",
    );
    let text = text.replace(
        "\"conv_kernel\": [\n    10,\n    3,\n    3,\n    2\n  ]",
        "\"conv_kernel\": [4096, 4096, 4096, 4096]",
    );
    let err = format!("{:#}", Wav2Vec2Config::from_json(&text).unwrap_err());
    assert!(err.contains("receptive field"), "{err}");

    let dir = TempDir::new("absurd");
    std::fs::copy(
        common::fixture("base_group").join("model.safetensors"),
        dir.0.join("model.safetensors"),
    )
    .unwrap();
    let mut ck = Checkpoint::open(&dir.0).unwrap();
    assert!(ck.take("encoder.layer_norm.weight", &[usize::MAX / 2, 3]).is_empty());
    let err = format!("{:#}", ck.finish().unwrap_err());
    assert!(err.contains("too large to load"), "{err}");
}

/// A small real cache (two utterances in one shard) written with the library's writer.
fn make_cache(dir: &Path) {
    let (teacher, _) = TeacherInfo::from_dir(&common::fixture("base_group"), true).unwrap();
    let layers = vec![1, 3];
    let plan = vec![
        PlannedUtterance {
            id: "03a01Wa".into(),
            frames: 3,
        },
        PlannedUtterance {
            id: "03a02Nc".into(),
            frames: 2,
        },
    ];
    let mut w = ShardWriter::create(dir, 0, CacheDType::F16, &layers, 32, &plan).unwrap();
    let offsets = w.offsets().to_vec();
    let values: Vec<f32> = (0..5 * 2 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    w.write_values(&values).unwrap();
    let entry = w.finish().unwrap();
    let mut m = Manifest::new(teacher, layers, CacheDType::F16, None);
    for (p, off) in plan.iter().zip(offsets) {
        m.utterances.push(UtteranceEntry {
            id: p.id.clone(),
            audio_sha256: "0".repeat(64),
            samples: 1000,
            frames: p.frames,
            shard: 0,
            offset: off,
        });
    }
    m.shards.push(entry);
    m.write(dir).unwrap();
}

fn try_cache(dir: &Path, what: &str) {
    let r = no_panic(what, || Manifest::read(dir));
    check_err(what, &r);
    let r = no_panic(what, || TeacherCache::open(dir));
    check_err(what, &r);
    if let Ok(c) = r {
        no_panic(what, || {
            check_err(what, &c.verify());
            let ids: Vec<String> = c.utterance_ids().map(String::from).collect();
            for id in ids {
                for l in [0, 1, 3, 99] {
                    check_err(what, &c.targets(&id, l));
                    check_err(what, &c.targets_range(&id, l, 1..usize::MAX));
                    #[allow(clippy::reversed_empty_ranges)]
                    check_err(what, &c.targets_range(&id, l, 2..1));
                }
            }
        });
    }
}

#[test]
fn fuzz_cache_manifest_and_shards() {
    let dir = TempDir::new("cache");
    make_cache(&dir.0);
    let manifest_path = dir.0.join("manifest.json");
    let shard_path = dir.0.join("shard-00000.safetensors");
    let manifest = std::fs::read(&manifest_path).unwrap();
    let shard = std::fs::read(&shard_path).unwrap();
    try_cache(&dir.0, "the unmutated cache");
    assert!(TeacherCache::open(&dir.0).unwrap().verify().is_ok());
    let t = Instant::now();
    let mut n = 0;
    let variants = json_variants(std::str::from_utf8(&manifest).unwrap());
    for (i, v) in variants.iter().enumerate() {
        std::fs::write(&manifest_path, v).unwrap();
        try_cache(&dir.0, &format!("manifest variant {i}: {v:.300}"));
        n += 1;
    }
    let mut rng = StdRng::seed_from_u64(400);
    for i in 0..400 {
        std::fs::write(&manifest_path, mutate(&mut rng, &manifest)).unwrap();
        try_cache(&dir.0, &format!("manifest mutation {i} (seed 400)"));
        n += 1;
    }
    std::fs::write(&manifest_path, &manifest).unwrap();
    let header = 8 + u64::from_le_bytes(shard[..8].try_into().unwrap()) as usize;
    for i in 0..400 {
        let mut m = mutate(&mut rng, &shard[..header]);
        m.extend_from_slice(&shard[header..]);
        if i % 2 == 0 {
            m.truncate(rng.gen_range(0..=m.len()));
        }
        std::fs::write(&shard_path, &m).unwrap();
        try_cache(&dir.0, &format!("shard mutation {i} (seed 400)"));
        n += 1;
    }
    eprintln!("{n} cache cases in {:.2} s", t.elapsed().as_secs_f64());
}
