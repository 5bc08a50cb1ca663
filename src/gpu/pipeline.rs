//! Shader modules and compute pipelines, each compiled once per device and cached by a key that is also
//! the pipeline's label: `shader::entry` plus any overridden constants; and the driver's compiled pipelines,
//! kept on disk between runs where the backend supports it ([`DiskCache`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};

/// One WGSL file from `shaders/`, embedded in the binary.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// `shader!("gelu")` embeds `shaders/gelu.wgsl` followed by `shaders/common.wgsl`, the functions shared by
/// several kernels (WGSL has no includes; appended, so the file's own line numbers hold in error messages).
#[macro_export]
macro_rules! shader {
    ($name:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl")),
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common.wgsl"))
            ),
        }
    };
}

pub(crate) struct PipelineCache {
    device: wgpu::Device,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
    disk: Option<DiskCache>,
}

impl PipelineCache {
    pub(crate) fn new(device: wgpu::Device, disk: Option<DiskCache>) -> Self {
        PipelineCache {
            device,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            disk,
        }
    }

    /// The file the driver's pipelines are kept in between runs, if any.
    pub(crate) fn disk_path(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.path.as_path())
    }

    /// Writes the driver's compiled pipelines to disk if this process compiled any new ones.
    pub(crate) fn save(&self) -> Result<()> {
        match &self.disk {
            Some(d) => d.save(),
            None => Ok(()),
        }
    }

    pub(crate) fn get(
        &self,
        shader: &'static Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let mut key = format!("{}::{entry}", shader.name);
        for (k, v) in constants {
            key.push_str(&format!(" {k}={v}"));
        }
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(shader)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: self.disk.as_ref().map(|d| &d.cache),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("compiling pipeline {key} failed: {e}");
        }
        if let Some(d) = &self.disk {
            d.dirty.store(true, Ordering::Relaxed);
        }
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, shader: &'static Shader) -> Result<wgpu::ShaderModule> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(shader.name) {
            return Ok(m.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("shaders/{}.wgsl does not compile: {e}", shader.name);
        }
        modules.insert(shader.name, module.clone());
        Ok(module)
    }
}

impl Drop for PipelineCache {
    /// A cache is never worth failing for: a write that fails is reported and forgotten.
    fn drop(&mut self) {
        if let Err(e) = self.save() {
            eprintln!("note: the pipeline cache was not saved: {e:#}");
        }
    }
}

/// The environment variable that places (a directory) or turns off (`0` or `off`) the on-disk pipeline cache.
pub const PIPELINE_CACHE_ENV: &str = "WGPU_MLKD_PIPELINE_CACHE";

/// Where the pipeline cache lives: `WGPU_MLKD_PIPELINE_CACHE` if set (`0`/`off`: nowhere), else
/// `$XDG_CACHE_HOME/wgpu-mlkd`, else `$HOME/.cache/wgpu-mlkd`.
pub(crate) fn pipeline_cache_dir_from_env() -> Option<PathBuf> {
    match std::env::var_os(PIPELINE_CACHE_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) if v == "0" || v.eq_ignore_ascii_case("off") => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })
            .map(|d| d.join("wgpu-mlkd")),
    }
}

/// The driver's compiled pipelines (a `VkPipelineCache` on Vulkan), loaded from disk when the device opens
/// and written back when it closes, so a second run does not compile its ~60 pipelines again (lavapipe: ~11 s
/// without Mesa's own shader cache). wgpu checks that the data came from the same adapter, driver and wgpu
/// version; the file adds a length and a checksum, so a truncated or damaged file is dropped (with a note)
/// and rewritten rather than handed to the driver.
pub(crate) struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// A pipeline was compiled since loading: the data on disk may be out of date.
    dirty: AtomicBool,
    /// Checksum of the data on disk, so an unchanged cache is not written again.
    on_disk: Mutex<Option<u64>>,
}

/// File header: magic, then the payload's length and FNV-1a 64 checksum (little-endian u64s).
const DISK_MAGIC: &[u8; 8] = b"WMLKDPC1";
const DISK_HEADER: usize = 24;

impl DiskCache {
    /// Opens the cache file for this adapter in `dir` (`None` where the backend has no pipeline cache). The
    /// device must have been opened with `Features::PIPELINE_CACHE`.
    pub(crate) fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo, dir: &Path) -> Option<DiskCache> {
        let key = wgpu::util::pipeline_cache_key(info)?;
        let path = dir.join(format!("{key}.bin"));
        let data = match std::fs::read(&path) {
            Ok(bytes) => match unwrap_disk_cache(&bytes) {
                Ok(data) => Some(data.to_vec()),
                Err(why) => {
                    eprintln!(
                        "note: ignoring the pipeline cache {}: {why}; it will be rebuilt",
                        path.display()
                    );
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                eprintln!(
                    "note: cannot read the pipeline cache {}: {e}; compiling every pipeline",
                    path.display()
                );
                None
            }
        };
        // SAFETY: the data is what `PipelineCache::get_data` returned for an adapter with the same cache key
        // (the checksum rules out damage on disk); wgpu checks the adapter, driver and wgpu version in its
        // header, and `fallback` makes it start empty when that check fails.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("wgpu-mlkd pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: AtomicBool::new(false),
            on_disk: Mutex::new(data.as_deref().map(fnv1a64)),
        })
    }

    fn save(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let Some(data) = self.cache.get_data() else {
            return Ok(());
        };
        let sum = fnv1a64(&data);
        let mut on_disk = self.on_disk.lock().unwrap_or_else(|p| p.into_inner());
        if *on_disk == Some(sum) {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::fsutil::atomic_write(&self.path, &wrap_disk_cache(&data))?;
        *on_disk = Some(sum);
        Ok(())
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn wrap_disk_cache(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK_HEADER + data.len());
    out.extend_from_slice(DISK_MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The payload of a cache file, or why it cannot be used.
fn unwrap_disk_cache(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    if bytes.len() < DISK_HEADER || &bytes[..8] != DISK_MAGIC {
        return Err("not a wgpu-mlkd pipeline cache file".into());
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let sum = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let data = &bytes[DISK_HEADER..];
    if data.len() as u64 != len {
        return Err(format!(
            "{} bytes of data where the header says {len} (truncated?)",
            data.len()
        ));
    }
    if fnv1a64(data) != sum {
        return Err("checksum mismatch (damaged)".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_cache_files_round_trip_and_damage_is_detected() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = wrap_disk_cache(&data);
        assert_eq!(unwrap_disk_cache(&file).unwrap(), &data[..]);
        // Truncated anywhere, header included.
        for cut in [0, 5, DISK_HEADER - 1, DISK_HEADER, file.len() - 1] {
            assert!(unwrap_disk_cache(&file[..cut]).is_err(), "cut at {cut}");
        }
        // One flipped bit in the payload, the length or the magic.
        for at in [0, 9, DISK_HEADER + 500, file.len() - 1] {
            let mut bad = file.clone();
            bad[at] ^= 0x10;
            assert!(unwrap_disk_cache(&bad).is_err(), "flip at {at}");
        }
    }
}
