//! A buffer pool that reuses storage buffers by size class.
//!
//! Size classes are the next of four steps per power of two (at most 25% waste). A buffer returns to the
//! pool when its last tensor drops; it may be handed out again while earlier commands that use it are still
//! pending, which is safe because every write to it (kernels and uploads alike) is recorded in program order.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

use super::bind::BindGroupCache;

use crate::fsutil::human_bytes;

/// The environment variable that caps the GPU memory a process's buffer pool may hold.
pub const MEMORY_LIMIT_ENV: &str = "WGPU_MLKD_GPU_MEMORY_LIMIT";

/// A size such as `4GiB`, `512MiB`, `1.5G` or `1000000` (bytes); units are binary (K = 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => bail!("{text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB or TiB)"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{text:?}: expected a size such as 512MiB or 4GiB"))?;
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        bail!("{text:?}: expected a size of at least 1 byte, such as 512MiB or 4GiB");
    }
    Ok(bytes as u64)
}

pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

pub(crate) struct BufferPool {
    device: wgpu::Device,
    /// Cached bind groups hold their buffers: dropped with the free buffers, so that memory is really freed.
    bind_groups: Arc<BindGroupCache>,
    limits: wgpu::Limits,
    /// Most bytes the pool may hold ([`super::GpuOptions::memory_limit`]); reaching it is handled exactly as
    /// the device running out of memory.
    memory_limit: Option<u64>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Free buffers by size class, each class handed out smallest first in wgpu's fixed order of buffers, so
    /// that the same sequence of requests from the same free buffers gets the same buffers: a model's second
    /// forward binds exactly what its first did, and finds its bind groups made (see `super::bind`). (A stack
    /// would hand them out in the order the last run freed them, a new permutation every run.)
    free: HashMap<u64, BTreeSet<wgpu::Buffer>>,
    /// Bytes of every buffer the pool has created and still holds (in use or free).
    allocated: u64,
    /// Bytes handed out to live tensors.
    in_use: u64,
    peak_in_use: u64,
}

/// Rounds a request up to its size class: 4 classes per power of two, at least 256 bytes.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let pow = 63 - (bytes - 1).leading_zeros().min(63) as u64; // floor(log2(bytes - 1))
    let step = (1u64 << pow) / 4;
    bytes.div_ceil(step.max(1)) * step.max(1)
}

impl BufferPool {
    pub(crate) fn new(
        device: wgpu::Device,
        limits: wgpu::Limits,
        memory_limit: Option<u64>,
        bind_groups: Arc<BindGroupCache>,
    ) -> Self {
        BufferPool {
            device,
            bind_groups,
            limits,
            memory_limit,
            state: Mutex::default(),
        }
    }

    /// A new buffer of `class` bytes, or why there is no memory for it: the memory limit, or the device's own
    /// out-of-memory error.
    fn create(&self, allocated: u64, class: u64) -> Result<wgpu::Buffer, String> {
        if let Some(limit) = self.memory_limit {
            if allocated + class > limit {
                return Err(format!(
                    "over the limit of {limit} bytes ({}) set by {MEMORY_LIMIT_ENV}",
                    human_bytes(limit)
                ));
            }
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: class,
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        });
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(e.to_string()),
            None => Ok(buffer),
        }
    }

    /// A storage buffer of at least `bytes` bytes. Errors (never panics) when the size is beyond the device.
    pub(crate) fn acquire(&self, bytes: u64) -> Result<(wgpu::Buffer, u64)> {
        let max_binding = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if bytes > max_binding {
            bail!(
                "a tensor of {bytes} bytes ({:.1} MiB) exceeds this GPU's largest storage binding of {max_binding} \
                 bytes ({:.1} MiB); the work must be split",
                bytes as f64 / 1048576.0,
                max_binding as f64 / 1048576.0
            );
        }
        let class = size_class(bytes).min(max_binding.max(bytes.div_ceil(4) * 4));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let buffer = match st.free.get_mut(&class).and_then(|v| v.pop_first()) {
            Some(b) => b,
            None => match self.create(st.allocated, class) {
                Ok(b) => {
                    st.allocated += class;
                    b
                }
                Err(why) => {
                    // Free cached buffers and try once more before giving up.
                    let cached: u64 = st.free.values().flatten().map(|b| b.size()).sum();
                    st.free.clear();
                    self.bind_groups.clear();
                    st.allocated -= cached;
                    let in_use = st.in_use;
                    drop(st);
                    if cached == 0 {
                        bail!(
                            "GPU out of memory allocating {class} bytes ({}) with {} in use by live tensors ({why}); \
                             use shorter audio, a smaller --batch or a GPU with more memory",
                            human_bytes(class),
                            human_bytes(in_use)
                        );
                    }
                    return self.acquire(bytes);
                }
            },
        };
        st.in_use += class;
        st.peak_in_use = st.peak_in_use.max(st.in_use);
        Ok((buffer, class))
    }

    pub(crate) fn release(&self, buffer: wgpu::Buffer, class: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.in_use -= class;
        st.free.entry(class).or_default().insert(buffer);
    }

    /// (bytes in use by live tensors, peak of that since the last reset).
    pub(crate) fn usage(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.in_use, st.peak_in_use)
    }

    pub(crate) fn reset_peak(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.peak_in_use = st.in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_waste_and_never_shrink() {
        let mut prev = 0;
        for bytes in (1..5000u64).chain([1 << 20, (1 << 20) + 1, 3 << 20, 100_000_007]) {
            let c = size_class(bytes);
            assert!(c >= bytes && c % 4 == 0, "{bytes} -> {c}");
            assert!(c as f64 <= (bytes.max(256) as f64) * 1.25 + 1.0, "{bytes} -> {c}");
            assert!(c >= prev);
            prev = c;
        }
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
    }
}
