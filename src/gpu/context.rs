//! Instance, adapter and device selection, and the pending-command recorder.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};

use super::pipeline::{DiskCache, PipelineCache, Shader};
use super::pool::BufferPool;

/// Which graphics API to run on (`--backend`, or `WGPU_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(BackendChoice::Vulkan),
            "metal" | "mtl" => Ok(BackendChoice::Metal),
            "dx12" | "d3d12" => Ok(BackendChoice::Dx12),
            "gl" | "gles" | "opengl" => Ok(BackendChoice::Gl),
            other => bail!("unknown backend {other:?} (expected vulkan, metal, dx12 or gl)"),
        }
    }
}

/// How to pick the adapter. Command-line flags override the environment.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub backend: Option<BackendChoice>,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Most GPU memory the buffer pool may hold, as given (e.g. `4GiB`; parsed when the device opens):
    /// allocations beyond it fail as if the device were out of memory. For sharing a GPU, or keeping well
    /// inside a driver that fails badly when it runs out.
    pub memory_limit: Option<String>,
    /// Time every kernel (`WGPU_MLKD_PROFILE=1`): each command is submitted and waited for on its own, and
    /// [`Gpu::profile_report`] sums the times per kernel. Slows everything down; for finding where time goes.
    pub profile: bool,
    /// Directory of the on-disk pipeline cache (`WGPU_MLKD_PIPELINE_CACHE`, default `~/.cache/wgpu-mlkd`);
    /// `None` compiles every pipeline afresh. Used where the backend supports it (Vulkan).
    pub pipeline_cache: Option<std::path::PathBuf>,
}

impl GpuOptions {
    /// `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`, as wgpu's own examples read them, and
    /// `WGPU_MLKD_GPU_MEMORY_LIMIT` and `WGPU_MLKD_PROFILE`.
    pub fn from_env() -> Self {
        let backend = std::env::var("WGPU_BACKEND")
            .ok()
            .and_then(|s| BackendChoice::parse(&s).ok());
        let adapter = std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty());
        let memory_limit = std::env::var(super::pool::MEMORY_LIMIT_ENV)
            .ok()
            .filter(|s| !s.is_empty());
        let profile = std::env::var(PROFILE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        GpuOptions {
            backend,
            adapter,
            memory_limit,
            profile,
            pipeline_cache: super::pipeline::pipeline_cache_dir_from_env(),
        }
    }

    /// Flags given on the command line win over the environment.
    pub fn with_overrides(mut self, backend: Option<BackendChoice>, adapter: Option<String>) -> Self {
        if backend.is_some() {
            self.backend = backend;
        }
        if adapter.is_some() {
            self.adapter = adapter;
        }
        self
    }

    fn backends(&self) -> wgpu::Backends {
        match self.backend {
            Some(b) => b.backends(),
            None => wgpu::Backends::all(),
        }
    }
}

/// What `wgpu-mlkd devices` prints for one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    /// The optional features wgpu-mlkd can use, as `devices` prints them (e.g. `subgroups 8`, `shader-f16`).
    pub features: Vec<String>,
}

impl AdapterSummary {
    fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let l = adapter.limits();
        AdapterSummary {
            features: useful_features(adapter.features(), &info),
            name: info.name,
            backend: format!("{:?}", info.backend).to_lowercase(),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            max_buffer_size: l.max_buffer_size,
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        }
    }
}

/// The adapter features some kernel or cache of wgpu-mlkd depends on.
fn useful_features(features: wgpu::Features, info: &wgpu::AdapterInfo) -> Vec<String> {
    let mut out = Vec::new();
    if features.contains(wgpu::Features::SUBGROUP) {
        let (lo, hi) = (info.subgroup_min_size, info.subgroup_max_size);
        out.push(if lo == hi {
            format!("subgroups {lo}")
        } else {
            format!("subgroups {lo}-{hi}")
        });
    }
    if features.contains(wgpu::Features::SHADER_F16) {
        out.push("shader-f16".into());
    }
    if features.contains(wgpu::Features::PIPELINE_CACHE) {
        out.push("pipeline-cache".into());
    }
    out
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        write!(
            f,
            "{} ({}, {}{})\n  max buffer {} MiB, max storage binding {} MiB, workgroup memory {} KiB, \
             {} invocations per workgroup, {} workgroups per dimension\n  features: {}",
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() {
                String::new()
            } else {
                format!(", {}", self.driver)
            },
            self.max_buffer_size / MIB,
            self.max_storage_buffer_binding_size / MIB,
            self.max_compute_workgroup_storage_size / 1024,
            self.max_compute_invocations_per_workgroup,
            self.max_compute_workgroups_per_dimension,
            if self.features.is_empty() {
                "none wgpu-mlkd uses".to_string()
            } else {
                self.features.join(", ")
            },
        )
    }
}

const NO_ADAPTER_HELP: &str = "wgpu-mlkd needs Vulkan, Metal, DX12 or OpenGL. \
On Linux without a GPU install Mesa's software Vulkan driver (Debian/Ubuntu: `apt-get install \
mesa-vulkan-drivers libvulkan1`) and run with WGPU_BACKEND=vulkan";

/// One GPU device, cheap to clone (a handle). Created once per process.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) summary: AdapterSummary,
    pub(crate) limits: wgpu::Limits,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pool: Arc<BufferPool>,
    /// Subgroup operations are enabled and every subgroup has exactly 8 invocations (lavapipe on AVX2):
    /// the matmul kernels of `shaders/matmul_sg.wgsl` assume that layout.
    pub(crate) subgroups_of_8: bool,
    /// Shaders may use unpack2x16float (wgpu's `SHADER_F16_IN_F32`: every native backend, except lavapipe
    /// without shader-f16): the f16-weight kernels need it.
    unpacks_f16: bool,
    pending: Mutex<Vec<Command>>,
    /// Command buffers submitted so far (tests check that a training step is one).
    submissions: std::sync::atomic::AtomicU64,
    /// First validation/out-of-memory error the device reported outside an error scope, or a device loss.
    device_error: Arc<Mutex<Option<String>>>,
    /// Per-kernel times when profiling ([`GpuOptions::profile`]).
    profile: Option<Mutex<BTreeMap<String, KernelTime>>>,
}

/// The environment variable that turns the per-kernel profile on.
pub const PROFILE_ENV: &str = "WGPU_MLKD_PROFILE";

/// One kernel's calls and summed time in the profile.
#[derive(Clone, Copy, Debug, Default)]
struct KernelTime {
    calls: u64,
    seconds: f64,
}

/// A recorded GPU command, encoded at the next flush.
pub(crate) enum Command {
    Dispatch {
        pipeline: wgpu::ComputePipeline,
        /// The shader file's name and the entry point (the profile's key is `shader::label`).
        shader: &'static str,
        label: &'static str,
        /// Storage buffers for bindings 1..=n (binding 0 is the uniform parameter block).
        buffers: Vec<wgpu::Buffer>,
        params: Vec<u32>,
        groups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

impl Gpu {
    /// Lists every adapter the selected backends expose.
    pub fn adapters(options: &GpuOptions) -> Vec<AdapterSummary> {
        let instance = make_instance(options);
        pollster::block_on(instance.enumerate_adapters(options.backends()))
            .iter()
            .map(AdapterSummary::of)
            .collect()
    }

    /// Picks an adapter (name filter first, then discrete > integrated > virtual > CPU) and opens a device
    /// with the adapter's own limits instead of WebGPU's small defaults.
    pub fn new(options: &GpuOptions) -> Result<Gpu> {
        let memory_limit = options
            .memory_limit
            .as_deref()
            .map(|m| super::pool::parse_size(m).with_context(|| super::pool::MEMORY_LIMIT_ENV))
            .transpose()?;
        let instance = make_instance(options);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(options.backends()));
        if adapters.is_empty() {
            match options.backend {
                Some(b) => bail!(
                    "no GPU adapter found for backend {b:?} (`wgpu-mlkd devices` without --backend lists what \
                     there is). {NO_ADAPTER_HELP}"
                ),
                None => bail!("no GPU adapter found. {NO_ADAPTER_HELP}"),
            }
        }
        if let Some(filter) = &options.adapter {
            let needle = filter.to_lowercase();
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&needle));
            if adapters.is_empty() {
                bail!("no adapter name contains {filter:?}; available: {}", names.join(", "));
            }
        }
        // Prefer real GPUs, then the native APIs over OpenGL (compute on GL is a fallback).
        adapters.sort_by_key(|a| {
            let info = a.get_info();
            let device = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu => 2,
                wgpu::DeviceType::Cpu => 3,
                wgpu::DeviceType::Other => 4,
            };
            (device, info.backend == wgpu::Backend::Gl)
        });
        let adapter = adapters.swap_remove(0);
        let summary = AdapterSummary::of(&adapter);
        let limits = adapter.limits();
        let info = adapter.get_info();
        let subgroups = adapter.features() & wgpu::Features::SUBGROUP;
        let unpacks_f16 = adapter
            .get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let pipeline_cache = match &options.pipeline_cache {
            Some(_) => adapter.features() & wgpu::Features::PIPELINE_CACHE,
            None => wgpu::Features::empty(),
        };
        let subgroups_of_8 = !subgroups.is_empty()
            && info.subgroup_min_size == 8
            && info.subgroup_max_size == 8
            && std::env::var_os("WGPU_MLKD_NO_SUBGROUPS").is_none();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpu-mlkd"),
            required_features: subgroups | pipeline_cache,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .with_context(|| format!("could not open a device on adapter {}", summary.name))?;

        let device_error = Arc::new(Mutex::new(None::<String>));
        {
            let slot = device_error.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                // The Display form of wgpu's errors is only "Validation Error"; the details are in the
                // description and the source chain.
                let detail = match &e {
                    wgpu::Error::Validation { description, .. } => description.clone(),
                    wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                    other => format!("{other:?}"),
                };
                let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
                if s.is_none() {
                    *s = Some(detail);
                }
            }));
            let slot = device_error.clone();
            // Every loss is recorded, `Destroyed` included: wgpu reports that one when the device is dropped
            // (then nobody reads the slot any more) or destroyed while still in use, which must fail the work.
            device.set_device_lost_callback(move |reason, msg| {
                // The loss explains every error after it (invalid buffers, failed submissions), so it replaces
                // whatever was recorded first.
                let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
                let detail = if msg.trim().is_empty() { String::new() } else { format!(": {msg}") };
                *s = Some(format!(
                    "GPU device lost ({reason:?}){detail}; the driver reset or the GPU went away. Rerun: cache-teacher, \
                     train and ser-train continue from their last saved work"
                ));
            });
        }
        let pool = Arc::new(BufferPool::new(device.clone(), limits.clone(), memory_limit));
        Ok(Gpu {
            inner: Arc::new(Inner {
                pipelines: PipelineCache::new(
                    device.clone(),
                    match &options.pipeline_cache {
                        Some(dir) if !pipeline_cache.is_empty() => DiskCache::open(&device, &info, dir),
                        _ => None,
                    },
                ),
                device,
                queue,
                summary,
                limits,
                pool,
                subgroups_of_8,
                unpacks_f16,
                pending: Mutex::new(Vec::new()),
                submissions: Default::default(),
                device_error,
                profile: options.profile.then(Mutex::default),
            }),
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.inner.summary
    }

    /// The file this device keeps its compiled pipelines in between runs, if any (see
    /// [`GpuOptions::pipeline_cache`]).
    pub fn pipeline_cache_file(&self) -> Option<&std::path::Path> {
        self.inner.pipelines.disk_path()
    }

    /// Writes the compiled pipelines to the cache file now, if any were compiled since it was read or last
    /// written. Done anyway when the device closes; `train` also does it with every checkpoint, so a run
    /// that is killed leaves its successor the compiled pipelines too.
    pub fn save_pipeline_cache(&self) -> Result<()> {
        self.inner.pipelines.save()
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// True when subgroup operations are on and subgroups have exactly 8 invocations (set
    /// `WGPU_MLKD_NO_SUBGROUPS` to turn the kernels that need this off).
    pub fn subgroups_of_8(&self) -> bool {
        self.inner.subgroups_of_8
    }

    /// True where shaders may unpack f16 pairs (the kernels with f16 weights need it).
    pub fn unpacks_f16(&self) -> bool {
        self.inner.unpacks_f16
    }

    /// True on a discrete or integrated GPU, false on CPU drivers (lavapipe, SwiftShader, WARP) and unknown
    /// devices: kernels whose speed depends on real shared memory are chosen by it.
    pub fn is_hardware_gpu(&self) -> bool {
        matches!(self.inner.summary.device_type.as_str(), "DiscreteGpu" | "IntegratedGpu")
    }

    /// Largest buffer one kernel may bind, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.inner
            .limits
            .max_storage_buffer_binding_size
            .min(self.inner.limits.max_buffer_size)
    }

    /// Bytes currently allocated by the buffer pool, and the peak since the last [`Gpu::reset_peak`].
    pub fn memory(&self) -> (u64, u64) {
        self.inner.pool.usage()
    }

    /// Destroys the device under every handle to it, as a driver reset or an unplugged GPU would: from then on
    /// every readback, flush and sync fails with "GPU device lost". For tests of that path; nothing else
    /// should call it.
    #[doc(hidden)]
    pub fn destroy_device(&self) {
        self.inner.device.destroy();
        // Let wgpu run the device-lost callback now, as it would on its next poll after a real loss.
        let _ = self.inner.device.poll(wgpu::PollType::Poll);
    }

    /// Command buffers submitted so far: every flush with pending work, every readback, is one.
    pub fn submissions(&self) -> u64 {
        self.inner.submissions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn reset_peak(&self) {
        self.inner.pool.reset_peak()
    }

    /// Records one compute dispatch. `buffers` go to bindings 1..=n in order; `params` (u32 words, f32 as
    /// bits) become the uniform block at binding 0. The grid is folded into 2-D when it exceeds 65535.
    pub fn dispatch(
        &self,
        shader: &'static Shader,
        entry: &'static str,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        groups: u32,
    ) -> Result<()> {
        self.dispatch_with(shader, entry, &[], buffers, params, groups)
    }

    /// As [`Gpu::dispatch`], with pipeline-overridable constants (part of the pipeline cache key).
    pub fn dispatch_with(
        &self,
        shader: &'static Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        groups: u32,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let folded = super::fold_grid(groups);
        let max = self.inner.limits.max_compute_workgroups_per_dimension;
        if folded[0] > max || folded[1] > max {
            bail!(
                "{}::{entry}: grid of {groups} workgroups exceeds the adapter's {max} per dimension",
                shader.name
            );
        }
        let pipeline = self.inner.pipelines.get(shader, entry, constants)?;
        self.record(Command::Dispatch {
            pipeline,
            shader: shader.name,
            label: entry,
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            params: params.to_vec(),
            groups: folded,
        });
        Ok(())
    }

    pub(crate) fn record(&self, cmd: Command) {
        let Some(profile) = &self.inner.profile else {
            self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).push(cmd);
            return;
        };
        // Profiling: run the uploads staged before this command (an empty submission carries them), then this
        // command alone, and time it. Nothing else is pending: every earlier command ran the same way.
        self.inner.queue.submit([]);
        let _ = self.inner.device.poll(wgpu::PollType::wait_indefinitely());
        let key = match &cmd {
            Command::Dispatch { shader, label, .. } => format!("{shader}::{label}"),
            Command::Copy { .. } => "buffer copy".to_string(),
        };
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).push(cmd);
        let started = std::time::Instant::now();
        // An error here is the device's; the caller's next flush or readback reports it.
        let _ = self.sync();
        let mut times = profile.lock().unwrap_or_else(|p| p.into_inner());
        let t = times.entry(key).or_default();
        t.calls += 1;
        t.seconds += started.elapsed().as_secs_f64();
    }

    /// Whether the per-kernel profile is on ([`GpuOptions::profile`]).
    pub fn profiling(&self) -> bool {
        self.inner.profile.is_some()
    }

    /// Forgets the kernel times so far (e.g. a warm-up's).
    pub fn profile_reset(&self) {
        if let Some(p) = &self.inner.profile {
            p.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// The kernels by total time, with calls, share and mean time, when profiling; `None` otherwise. Each time
    /// is a command submitted and waited for on its own, so it includes one submission's overhead.
    pub fn profile_report(&self) -> Option<String> {
        let times = self
            .inner
            .profile
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let total: f64 = times.values().map(|t| t.seconds).sum();
        let mut rows: Vec<(String, KernelTime)> = times.into_iter().collect();
        rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(6).max(6);
        let mut out = format!(
            "{:width$}  {:>7}  {:>10}  {:>6}  {:>10}\n",
            "kernel", "calls", "total s", "share", "mean ms"
        );
        for (k, t) in &rows {
            out += &format!(
                "{k:width$}  {:>7}  {:>10.3}  {:>5.1}%  {:>10.3}\n",
                t.calls,
                t.seconds,
                100.0 * t.seconds / total.max(1e-12),
                1e3 * t.seconds / t.calls as f64
            );
        }
        out += &format!(
            "{:width$}  {:>7}  {:>10.3}",
            "total",
            rows.iter().map(|(_, t)| t.calls).sum::<u64>(),
            total
        );
        Some(out)
    }

    /// Encodes every pending command into one command encoder and submits it. Does not wait.
    pub fn flush(&self) -> Result<()> {
        // The lock is held through the submission so that concurrent flushes reach the queue in the order
        // their commands were recorded.
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            self.encode_and_submit(std::mem::take(&mut *pending));
        }
        drop(pending);
        self.check_device_error()
    }

    /// Flushes and blocks until the GPU is idle.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU failed: {e}"))?;
        self.check_device_error()
    }

    fn check_device_error(&self) -> Result<()> {
        if let Some(e) = self
            .inner
            .device_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            bail!("GPU error: {e}");
        }
        Ok(())
    }

    fn encode_and_submit(&self, cmds: Vec<Command>) {
        let device = &self.inner.device;
        // All parameter blocks of this submission live in one uniform buffer, one aligned slot each.
        let align = self.inner.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let n_dispatch = cmds.iter().filter(|c| matches!(c, Command::Dispatch { .. })).count();
        let mut slots = Vec::with_capacity(n_dispatch);
        let mut bytes: Vec<u8> = Vec::new();
        for c in &cmds {
            if let Command::Dispatch { params, .. } = c {
                let start = bytes.len();
                // A uniform binding's size is a multiple of 16 bytes (WGSL struct alignment).
                let size = (params.len() * 4).max(16).div_ceil(16) * 16;
                slots.push((start as u64, size as u64));
                bytes.extend_from_slice(bytemuck::cast_slice(params));
                bytes.resize(start + size.div_ceil(align) * align, 0);
            }
        }
        let uniforms = (n_dispatch > 0).then(|| {
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: bytes.len().max(align) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.inner.queue.write_buffer(&buf, 0, &bytes);
            buf
        });

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        let mut slot = slots.into_iter();
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        for cmd in cmds {
            match cmd {
                Command::Dispatch {
                    pipeline,
                    label,
                    buffers,
                    groups,
                    ..
                } => {
                    let (offset, size) = slot.next().expect("one slot per dispatch");
                    let mut entries = Vec::with_capacity(buffers.len() + 1);
                    entries.push(wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: uniforms.as_ref().expect("uniform buffer"),
                            offset,
                            size: std::num::NonZeroU64::new(size),
                        }),
                    });
                    for (i, b) in buffers.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: b.as_entire_binding(),
                        });
                    }
                    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(label),
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    });
                    let p = pass.get_or_insert_with(|| {
                        encoder
                            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                label: None,
                                timestamp_writes: None,
                            })
                            .forget_lifetime()
                    });
                    p.set_pipeline(&pipeline);
                    p.set_bind_group(0, &bind_group, &[]);
                    p.dispatch_workgroups(groups[0], groups[1], groups[2]);
                }
                Command::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => {
                    drop(pass.take());
                    encoder.copy_buffer_to_buffer(&src, src_offset, &dst, dst_offset, size);
                }
            }
        }
        drop(pass);
        self.inner.queue.submit([encoder.finish()]);
        self.inner
            .submissions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Buffer creation beyond this share of the driver's memory budget (where it reports one, as with
/// `VK_EXT_memory_budget`) fails with an out-of-memory error that the buffer pool reports, instead of pushing
/// the driver to its limit: there a driver may fail in ways nothing can catch (lavapipe under an address-space
/// cap reported its allocations as made and the process crashed when it used them).
const MEMORY_BUDGET_PERCENT: u8 = 95;

fn make_instance(options: &GpuOptions) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = options.backends();
    desc.memory_budget_thresholds.for_resource_creation = Some(MEMORY_BUDGET_PERCENT);
    wgpu::Instance::new(desc)
}
