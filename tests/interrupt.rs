//! Interruption and exclusion for `cache-teacher`: a run killed with SIGKILL at random moments, again and
//! again, resumes and finishes byte-identical to an uninterrupted run; a second process on the same output is
//! refused (lock file), and a lock left by a dead process is taken over. The long kill loop is #[ignore]d
//! (`cargo test --release --test interrupt -- --ignored`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, stderr};
use rand::{Rng, SeedableRng};
use wgpu_mlkd::data::wav;
use wgpu_mlkd::fsutil::OutputLock;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-int-{}-{name}", std::process::id()));
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

/// `n` EmoDB-named WAVs of 0.2 to 0.6 s.
fn corpus(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let len = 3200 + 1600 * (i % 5);
        let x: Vec<f32> = (0..len)
            .map(|t| 0.3 * ((t as f32) * (0.02 + 0.003 * i as f32)).sin())
            .collect();
        wav::write_wav_i16(&dir.join(format!("{:02}a01Wa.wav", 10 + i)), &x, 16000).unwrap();
    }
}

fn cache_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "cache-teacher",
        "--teacher",
        common::fixture("base_group").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-shard-utterances",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

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
fn ok(o: Output) -> String {
    let err = stderr(&o);
    assert!(o.status.success() && !err.contains("panicked"), "failed: {err}");
    err
}

/// Kills a cache-teacher run `kills` times at random moments (seeded), resuming each time, then finishes it;
/// the result must equal an uninterrupted run's, file for file.
fn kill_loop(name: &str, utterances: usize, kills: usize, seed: u64) {
    let dir = TempDir::new(name);
    let data = dir.path("data");
    corpus(&data, utterances);
    let full = dir.path("full");
    let t = Instant::now();
    ok(bin().args(cache_args(&data, &full)).output().unwrap());
    let full_secs = t.elapsed().as_secs_f64();
    let out = dir.path("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut finished_early = 0;
    for k in 0..kills {
        let mut child = bin()
            .args(cache_args(&data, &out))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Anywhere from start-up to past the whole run's length.
        let at = Duration::from_secs_f64(rng.gen_range(0.0..full_secs * 1.1));
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let o = child.wait_with_output().unwrap(); // reaped: its pid is then certainly dead
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "kill {k}: {err}");
        if o.status.success() {
            finished_early += 1;
        }
        eprintln!(
            "kill {k} at {:.2} s: {}",
            at.as_secs_f64(),
            if o.status.success() { "had finished" } else { "killed" }
        );
    }
    let err = ok(bin().args(cache_args(&data, &out)).output().unwrap());
    eprintln!("final run: {}", err.lines().last().unwrap_or(""));
    let (a, b) = (files(&full), files(&out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs after {kills} kills");
    }
    eprintln!(
        "{kills} kills ({finished_early} landed after the run had finished), uninterrupted run {full_secs:.2} s: \
         identical"
    );
}

#[test]
fn repeated_sigkill_resumes_to_an_identical_cache() {
    kill_loop("kill-fast", 8, 5, 7);
}

#[test]
#[ignore = "slow: 40 kills over a larger corpus"]
fn repeated_sigkill_resumes_to_an_identical_cache_long() {
    kill_loop("kill-long", 30, 40, 11);
}

#[test]
fn a_second_process_on_the_same_cache_is_refused() {
    let dir = TempDir::new("lock");
    let data = dir.path("data");
    corpus(&data, 4);
    let out = dir.path("cache");

    // Deterministic: this test process holds the lock.
    std::fs::create_dir_all(&out).unwrap();
    let lock = OutputLock::acquire(&out, "the test").unwrap();
    let o = bin().args(cache_args(&data, &out)).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let me = format!("is in use by process {}", std::process::id());
    for needle in [me.as_str(), "the test", "if that process is gone, remove", ".lock"] {
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(files(&out).len(), 1, "only the lock: {:?}", files(&out).keys());
    drop(lock);

    // Two real processes: the second, started while the first holds the lock, is refused.
    std::fs::remove_dir_all(&out).unwrap();
    corpus(&data, 24);
    let first = bin()
        .args(cache_args(&data, &out))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !out.join(".lock").exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = bin().args(cache_args(&data, &out)).output().unwrap();
    let first = first.wait_with_output().unwrap();
    ok(first);
    let err = stderr(&second);
    if second.status.success() {
        eprintln!("SKIPPED the two-process race: the first run finished before the second started ({err})");
    } else {
        assert!(
            err.contains("is in use by process") && err.contains("cache-teacher"),
            "{err}"
        );
    }
    assert!(!out.join(".lock").exists(), "the lock is released at the end");
}

#[test]
fn a_stale_lock_of_a_dead_process_is_taken_over() {
    let dir = TempDir::new("stale");
    let data = dir.path("data");
    corpus(&data, 3);
    let out = dir.path("cache");
    std::fs::create_dir_all(&out).unwrap();
    // A process that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let host = {
        // Same host as the binary will see.
        let lock = OutputLock::acquire(&out, "probe").unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        text.lines().find_map(|l| l.strip_prefix("host ")).unwrap().to_string()
    };
    std::fs::write(
        out.join(".lock"),
        format!("pid {pid}\nhost {host}\nstarted 1700000000\ncommand wgpu-mlkd cache-teacher\n"),
    )
    .unwrap();
    let err = ok(bin().args(cache_args(&data, &out)).output().unwrap());
    assert!(
        err.contains(&format!("left by process {pid}")) && err.contains("taking it over"),
        "{err}"
    );
    assert!(!out.join(".lock").exists());
}
