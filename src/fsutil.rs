//! File output that never leaves a half-written file (write to a temporary file beside the target, sync,
//! then rename over it), and a lock file that keeps two processes out of one output directory.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};

/// Checks that `path` can be written as a file: its parent is an existing directory and `path` itself is
/// not a directory. Call it before long work so that a bad `--out` fails at once.
pub fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("output {} is an existing directory; give a file name", path.display());
    }
    let parent = parent_dir(path);
    if !parent.exists() {
        // Name the culprit when a file stands where a directory should (a/file/out.bin).
        if let Some(file) = parent.ancestors().skip(1).find(|a| a.is_file()) {
            bail!("cannot write {}: {} is not a directory", path.display(), file.display());
        }
        bail!(
            "cannot write {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    if !parent.is_dir() {
        bail!(
            "cannot write {}: {} is not a directory",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A size in the largest binary unit that keeps the number at least 1 (`300 B`, `1.5 MiB`, `52.0 GiB`), for
/// messages about files, disks and GPU memory.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Writes `bytes` to `path` atomically. On any error (a full disk included) the temporary file is removed
/// and an existing `path` is left untouched.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    check_output_file(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent_dir(path).join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Name of the lock file [`OutputLock`] creates inside an output directory.
pub const LOCK_FILE: &str = ".lock";

/// Lock files this process holds (canonical paths), so that a second acquire in the same process is refused
/// rather than mistaken for a stale lock of a process with a reused id.
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Exclusive use of an output directory by one process: `DIR/.lock` holds the owner's process id, host name,
/// start time and command. Released (the file removed) on drop. A lock left by a process that died (killed,
/// crashed) on this host is taken over with a note on stderr; a live owner, another host's lock or an
/// unreadable lock is an error that says how to proceed.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    key: PathBuf,
}

/// What a lock file records.
#[derive(Debug, Clone, PartialEq)]
struct LockInfo {
    pid: u32,
    host: String,
    started: u64,
    command: String,
}

impl LockInfo {
    fn mine(what: &str) -> LockInfo {
        LockInfo {
            pid: std::process::id(),
            host: hostname(),
            started: unix_now(),
            command: what.replace('\n', " "),
        }
    }

    fn render(&self) -> String {
        format!(
            "pid {}\nhost {}\nstarted {}\ncommand {}\n",
            self.pid, self.host, self.started, self.command
        )
    }

    fn parse(text: &str) -> Option<LockInfo> {
        let mut info = LockInfo {
            pid: 0,
            host: String::new(),
            started: 0,
            command: String::new(),
        };
        let mut have_pid = false;
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "pid" => {
                    info.pid = value.trim().parse().ok()?;
                    have_pid = true;
                }
                "host" => info.host = value.trim().to_string(),
                "started" => info.started = value.trim().parse().unwrap_or(0),
                "command" => info.command = value.to_string(),
                _ => {}
            }
        }
        (have_pid && info.pid != 0).then_some(info)
    }

    fn describe(&self) -> String {
        let age = unix_now().saturating_sub(self.started);
        let started = if self.started == 0 {
            "at an unknown time".to_string()
        } else if age < 120 {
            format!("{age} s ago")
        } else if age < 7200 {
            format!("{} min ago", age / 60)
        } else {
            format!("{:.1} h ago", age as f64 / 3600.0)
        };
        let cmd = if self.command.is_empty() {
            String::new()
        } else {
            format!(", {}", self.command)
        };
        format!("process {} on {} (started {started}{cmd})", self.pid, self.host)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's host name ("unknown" where it cannot be read).
fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
            if !name.is_empty() {
                return name;
            }
        }
    }
    std::env::var("COMPUTERNAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether process `pid` on this host is certainly gone.
fn process_is_dead(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
}

impl OutputLock {
    /// Locks directory `dir` (which must exist) for this process; `what` names the command in the lock file
    /// and in the message another process gets.
    pub fn acquire(dir: &Path, what: &str) -> Result<OutputLock> {
        if !dir.is_dir() {
            bail!("cannot lock {}: not an existing directory", dir.display());
        }
        let path = dir.join(LOCK_FILE);
        let key = std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .join(LOCK_FILE);
        {
            let held = HELD.lock().unwrap_or_else(|p| p.into_inner());
            if held.contains(&key) {
                bail!("{} is already in use by this process ({what})", dir.display());
            }
        }
        let mine = LockInfo::mine(what);
        // The lock appears with its content at once: written to a private file, then hard-linked to .lock
        // (which fails if .lock exists), so a reader never sees an empty lock.
        let tmp = dir.join(format!("{LOCK_FILE}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, mine.render()).with_context(|| format!("cannot write {}", tmp.display()))?;
        let result = Self::link_or_take_over(dir, &tmp, &path, &mine);
        let _ = std::fs::remove_file(&tmp);
        result?;
        HELD.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        Ok(OutputLock { path, key })
    }

    fn link_or_take_over(dir: &Path, tmp: &Path, path: &Path, mine: &LockInfo) -> Result<()> {
        let in_use_hint = |who: &str| {
            format!(
                "{} is in use by {who}; if that process is gone, remove {}",
                dir.display(),
                path.display()
            )
        };
        for _ in 0..5 {
            match std::fs::hard_link(tmp, path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    // File systems without hard links: fall back to an exclusive create.
                    let created = std::fs::OpenOptions::new().write(true).create_new(true).open(path);
                    match created {
                        Ok(mut f) => {
                            f.write_all(mine.render().as_bytes())
                                .with_context(|| format!("cannot write {}", path.display()))?;
                            return Ok(());
                        }
                        Err(e2) if e2.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(_) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
                    }
                }
            }
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // released meanwhile
                Err(e) => return Err(e).with_context(|| format!("cannot read the lock file {}", path.display())),
            };
            let Some(owner) = LockInfo::parse(&text) else {
                bail!(
                    "{} is locked by {}, which is not a lock file this program understands; if no other \
                     process uses the directory, remove it",
                    dir.display(),
                    path.display()
                );
            };
            let same_host = owner.host == mine.host;
            // Our own id in a lock we do not hold (see HELD) is a reused id of a dead process.
            let dead = same_host && (owner.pid == mine.pid || process_is_dead(owner.pid));
            if !dead {
                bail!("{}", in_use_hint(&owner.describe()));
            }
            // Take the stale lock aside under a private name; if another process replaced it meanwhile by a
            // live lock, put that one back.
            let aside = dir.join(format!("{LOCK_FILE}.stale.{}.tmp", std::process::id()));
            match std::fs::rename(path, &aside) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot remove the stale lock {}", path.display())),
            }
            let moved = std::fs::read_to_string(&aside).ok().and_then(|t| LockInfo::parse(&t));
            if moved.as_ref() != Some(&owner) {
                let _ = std::fs::hard_link(&aside, path);
                let _ = std::fs::remove_file(&aside);
                continue;
            }
            let _ = std::fs::remove_file(&aside);
            eprintln!(
                "note: {} was left by {}, which is no longer running; taking it over",
                path.display(),
                owner.describe()
            );
        }
        bail!(
            "{}",
            in_use_hint("another process (the lock changed hands while this one tried to take it)")
        )
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        HELD.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Whether `name` is a file [`OutputLock`] creates (the lock or its short-lived temporary files).
pub fn is_lock_file(name: &str) -> bool {
    name == LOCK_FILE || (name.starts_with(".lock.") && name.ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_refuses_bad_targets() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("out.bin");
        atomic_write(&f, b"one").unwrap();
        atomic_write(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert!(format!("{:#}", atomic_write(&dir, b"x").unwrap_err()).contains("directory"));
        let under_file = f.join("child.bin");
        assert!(format!("{:#}", atomic_write(&under_file, b"x").unwrap_err()).contains("not a directory"));
        let missing = dir.join("missing").join("x.bin");
        assert!(format!("{:#}", atomic_write(&missing, b"x").unwrap_err()).contains("does not exist"));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_lock_excludes_and_recovers_stale_locks() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lock_path = dir.join(LOCK_FILE);

        let lock = OutputLock::acquire(&dir, "test one").unwrap();
        let text = std::fs::read_to_string(&lock_path).unwrap();
        assert!(
            text.contains(&format!("pid {}", std::process::id())) && text.contains("command test one"),
            "{text}"
        );
        let err = format!("{:#}", OutputLock::acquire(&dir, "test two").unwrap_err());
        assert!(err.contains("already in use by this process"), "{err}");
        drop(lock);
        assert!(!lock_path.exists());

        // A live process on this host (pid 1 always exists): refused, naming it and the way out.
        let live = LockInfo {
            pid: 1,
            host: hostname(),
            started: unix_now() - 30,
            command: "cache-teacher".into(),
        };
        std::fs::write(&lock_path, live.render()).unwrap();
        let err = format!("{:#}", OutputLock::acquire(&dir, "x").unwrap_err());
        assert!(
            err.contains("in use by process 1 on")
                && err.contains("30 s ago")
                && err.contains("remove")
                && err.contains(".lock"),
            "{err}"
        );
        // Another host's lock cannot be checked: refused.
        let other = LockInfo {
            host: "elsewhere.invalid".into(),
            ..live.clone()
        };
        std::fs::write(&lock_path, other.render()).unwrap();
        let err = format!("{:#}", OutputLock::acquire(&dir, "x").unwrap_err());
        assert!(err.contains("elsewhere.invalid"), "{err}");
        // Garbage: refused with the file named.
        std::fs::write(&lock_path, "hello").unwrap();
        let err = format!("{:#}", OutputLock::acquire(&dir, "x").unwrap_err());
        assert!(err.contains("not a lock file") && err.contains(".lock"), "{err}");

        // A dead process (a child that exited and was reaped): taken over.
        #[cfg(unix)]
        {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            let dead = LockInfo { pid, ..live };
            std::fs::write(&lock_path, dead.render()).unwrap();
            let lock = OutputLock::acquire(&dir, "after crash").unwrap();
            assert!(std::fs::read_to_string(&lock_path)
                .unwrap()
                .contains("command after crash"));
            drop(lock);
        }
        // Nothing but (at most) the test's own files is left.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.iter().all(|n| n.to_string_lossy() == LOCK_FILE), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
