//! The GPU tensor: a pooled storage buffer, a shape and a dtype. Contiguous, row-major.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::context::{Command, Gpu};
use super::pool::BufferPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        4
    }
}

/// Returns its buffer to the pool when the last tensor that shares it drops.
struct Storage {
    buffer: Option<wgpu::Buffer>,
    class: u64,
    pool: Arc<BufferPool>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.release(b, self.class);
        }
    }
}

/// A GPU tensor. Cloning shares the buffer (no copy).
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
    gpu: Gpu,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

impl Tensor {
    /// An uninitialised tensor (its contents are whatever the pooled buffer held).
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        // Checked: an absurd shape (from a corrupt file) must be refused, not wrap around to a small buffer.
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .map(|b| b.max(dtype.size()) as u64)
            .ok_or_else(|| anyhow!("tensor of shape {shape:?}: its size overflows"))?;
        let (buffer, class) = gpu
            .inner
            .pool
            .acquire(bytes)
            .map_err(|e| anyhow!("tensor of shape {shape:?}: {e}"))?;
        Ok(Tensor {
            storage: Arc::new(Storage {
                buffer: Some(buffer),
                class,
                pool: gpu.inner.pool.clone(),
            }),
            shape: shape.to_vec(),
            dtype,
            gpu: gpu.clone(),
        })
    }

    /// Uploads `data` (f32). The upload is recorded in program order with the kernels (see `gpu` docs).
    pub fn from_slice(gpu: &Gpu, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Self::upload(gpu, bytemuck::cast_slice(data), data.len(), shape, DType::F32)
    }

    pub fn from_u32(gpu: &Gpu, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        Self::upload(gpu, bytemuck::cast_slice(data), data.len(), shape, DType::U32)
    }

    /// A tensor filled with zeros.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, DType::F32)?;
        t.fill(0.0)?;
        Ok(t)
    }

    fn upload(gpu: &Gpu, bytes: &[u8], len: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != len {
            bail!("upload: {len} values do not fill shape {shape:?} ({numel} elements)");
        }
        let t = Tensor::empty(gpu, shape, dtype)?;
        if !bytes.is_empty() {
            let device = &gpu.inner.device;
            let size = (bytes.len() as u64).div_ceil(4) * 4;
            let staging = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("upload"),
                size,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::MAP_WRITE,
                mapped_at_creation: true,
            });
            debug_assert_eq!(size, bytes.len() as u64, "4-byte elements");
            staging
                .get_mapped_range_mut(..)
                .map_err(|e| anyhow!("mapping an upload buffer failed: {e}"))?
                .copy_from_slice(bytes);
            staging.unmap();
            gpu.record(Command::Copy {
                src: staging,
                src_offset: 0,
                dst: t.buffer().clone(),
                dst_offset: 0,
                size,
            })?;
        }
        Ok(t)
    }

    /// Sets every element to `value`.
    pub fn fill(&self, value: f32) -> Result<()> {
        crate::ops::elementwise::fill(self, value)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer.as_ref().expect("live tensor has a buffer")
    }

    /// The same data viewed with another shape of equal element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!(
                "cannot reshape {:?} ({} elements) to {shape:?} ({n})",
                self.shape,
                self.numel()
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// Copies `len` elements from `src[src_start..]` into `self[dst_start..]`, in program order.
    pub fn copy_from(&self, dst_start: usize, src: &Tensor, src_start: usize, len: usize) -> Result<()> {
        if src_start + len > src.numel() || dst_start + len > self.numel() {
            bail!(
                "copy of {len} elements out of bounds ({:?}[{src_start}..] -> {:?}[{dst_start}..])",
                src.shape,
                self.shape
            );
        }
        if len > 0 {
            self.gpu.record(Command::Copy {
                src: src.buffer().clone(),
                src_offset: (src_start * 4) as u64,
                dst: self.buffer().clone(),
                dst_offset: (dst_start * 4) as u64,
                size: (len * 4) as u64,
            })?;
        }
        Ok(())
    }

    /// Reads the tensor back (f32). Flushes every pending command first.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if self.dtype != DType::F32 {
            bail!("to_vec on a {:?} tensor", self.dtype);
        }
        Ok(bytemuck::cast_slice(&self.read_bytes()?).to_vec())
    }

    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        Ok(bytemuck::cast_slice(&self.read_bytes()?).to_vec())
    }

    fn read_bytes(&self) -> Result<Vec<u8>> {
        let size = (self.numel() * self.dtype.size()) as u64;
        if size == 0 {
            return Ok(Vec::new());
        }
        let gpu = &self.gpu;
        let staging = gpu.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.record(Command::Copy {
            src: self.buffer().clone(),
            src_offset: 0,
            dst: staging.clone(),
            dst_offset: 0,
            size,
        })?;
        gpu.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        gpu.sync()?;
        rx.recv()
            .map_err(|_| anyhow!("GPU readback was never answered"))?
            .map_err(|e| anyhow!("GPU readback failed: {e}"))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| anyhow!("GPU readback failed: {e}"))?;
        let out = view.to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}
