//! `wgpu-mlkd dataset` end to end on a small fake EmoDB tree with bad files: it fails listing every
//! one of them, and with `--skip-bad` it succeeds and still reports them. Also the real EmoDB
//! development set when ../shared is present.

mod common;

use common::run;
use std::path::{Path, PathBuf};
use std::process::Output;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A fresh folder for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-dataset-cli-{}-{name}", std::process::id()));
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

fn write_wav(path: &Path, frames: usize, rate: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..frames {
        w.write_sample(((i as f32 * 0.07).sin() * 8000.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn dataset_command_lists_bad_files_and_skip_bad_goes_on() {
    let dir = TempDir::new("emodb");
    let d = &dir.0;
    write_wav(&d.join("03a01Wa.wav"), 16000, 16000);
    write_wav(&d.join("03a02Nc.wav"), 8000, 16000);
    write_wav(&d.join("08b01Fa.wav"), 22050, 22050);
    std::fs::write(d.join("08b02Ta.wav"), b"").unwrap();
    std::fs::write(d.join("08b03La.wav"), b"this is not a wav file").unwrap();
    let good = std::fs::read(d.join("03a02Nc.wav")).unwrap();
    std::fs::write(d.join("09a01Aa.wav"), &good[..good.len() / 2]).unwrap();
    write_wav(&d.join("recording.wav"), 100, 16000);
    let dir_s = d.to_str().unwrap();

    let o = run(&["dataset", dir_s]);
    let (out, err) = text(&o);
    eprintln!("--- without --skip-bad\n{out}{err}");
    assert!(!o.status.success(), "must fail with bad files");
    for name in ["08b02Ta.wav", "08b03La.wav", "09a01Aa.wav"] {
        assert!(err.contains(name), "{name} not listed in stderr: {err}");
        assert!(out.contains(name), "{name} not listed in stdout: {out}");
    }
    assert!(err.contains("3 bad audio files") && err.contains("--skip-bad"), "{err}");
    assert!(err.contains("empty file") && err.contains("not a WAV file") && err.contains("truncated"));
    assert!(out.contains("recording.wav") && out.contains("EmoDB form"), "{out}");
    assert!(!err.contains("panicked"), "{err}");

    let o = run(&["dataset", dir_s, "--skip-bad"]);
    let (out, err) = text(&o);
    eprintln!("--- with --skip-bad\n{out}{err}");
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("EmoDB dataset"), "{out}");
    assert!(out.contains("utterances: 3 (3 labels, 2 speakers)"), "{out}");
    assert!(out.contains("bad audio files (3, left out by --skip-bad)"), "{out}");
    for name in ["08b02Ta.wav", "08b03La.wav", "09a01Aa.wav", "recording.wav"] {
        assert!(out.contains(name), "{name} not reported: {out}");
    }
    assert!(
        out.contains("16000 Hz (2), 22050 Hz (1)") && out.contains("channels: mono (3)"),
        "{out}"
    );
    assert!(out.contains("2.5 s (0:00:03) in all"), "{out}");

    let o = run(&["dataset", d.join("nothing.csv").to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("nothing.csv"), "{err}");
}

#[test]
fn dataset_command_on_the_real_emodb_dev_set() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/emodb-dev");
    if !dir.is_dir() {
        eprintln!("SKIPPED: {} is absent (the shared development data)", dir.display());
        return;
    }
    let o = run(&["dataset", dir.to_str().unwrap()]);
    let (out, err) = text(&o);
    eprintln!("{out}{err}");
    assert!(o.status.success(), "{err}");
    assert!(out.contains("utterances: 304 (7 labels, 6 speakers)"), "{out}");
    assert!(
        out.contains("22050 Hz (304)") && out.contains("bad audio files (0)"),
        "{out}"
    );
}
