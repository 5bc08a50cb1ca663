//! File output that never leaves a half-written file: write to a temporary file beside the target, sync,
//! then rename over it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Checks that `path` can be written as a file: its parent is an existing directory and `path` itself is
/// not a directory. Call it before long work so that a bad `--out` fails at once.
pub fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("output {} is an existing directory; give a file name", path.display());
    }
    let parent = parent_dir(path);
    if !parent.exists() {
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
}
