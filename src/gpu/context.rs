//! Instance, adapter and device selection, and the pending-command recorder.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};

use super::bind::BindGroupCache;
use super::pipeline::{DiskCache, Pipeline, PipelineCache, Shader, PARAMS_BINDING_BYTES};
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
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub backend: Option<BackendChoice>,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Most GPU memory the buffer pool may hold, as given (e.g. `4GiB`; parsed when the device opens):
    /// allocations beyond it fail as if the device were out of memory. For sharing a GPU, or keeping well
    /// inside a driver that fails badly when it runs out.
    pub memory_limit: Option<String>,
    /// Time every kernel (`WGPU_MLKD_PROFILE=1`): each command is submitted and waited for on its own, and
    /// [`Gpu::profile_report`] sums the times per kernel: the wall-clock time of each submission and, where the
    /// adapter has timestamp queries, the GPU time of each compute pass. Slows everything down; for finding where
    /// time goes.
    pub profile: bool,
    /// Directory of the on-disk pipeline cache (`WGPU_MLKD_PIPELINE_CACHE`, default `~/.cache/wgpu-mlkd`);
    /// `None` compiles every pipeline afresh. Used where the backend supports it (Vulkan).
    pub pipeline_cache: Option<std::path::PathBuf>,
    /// Every dispatch makes its own bind group instead of reusing the one made for the same buffers
    /// (`WGPU_MLKD_NO_BIND_GROUP_CACHE=1`): only for measuring what the reuse saves.
    pub fresh_bind_groups: bool,
    /// Pending commands are submitted whenever this many have been recorded (`WGPU_MLKD_SUBMIT_EVERY`; 0
    /// submits only at a flush or readback), so that the GPU starts on the first kernels of a forward or
    /// training step while the host still records the rest. Submissions stay in program order on the one
    /// queue, so results do not change. `None`: [`DEFAULT_SUBMIT_EVERY`] on hardware GPUs, 0 on CPU drivers,
    /// where the "GPU" is the host's own cores (lavapipe, whose submit also blocks until the previous one has
    /// run, so the host's time per dispatch would count the kernels').
    pub submit_every: Option<usize>,
}

/// How many commands [`GpuOptions::submit_every`] gathers into one submission on a hardware GPU unless
/// `WGPU_MLKD_SUBMIT_EVERY` says otherwise: small enough that the GPU starts early (the host takes 1.3-1.5 ms
/// to record a whole teacher forward on the H100's machine, ~7 us a dispatch), large enough that a submission's own cost stays small
/// beside the kernels it carries. On the H100 (benches/RESULTS.md, "H100, session 10") 32 took the teacher
/// forward from 14.5 to 13.5 ms and the training step from 16.0 to 13.9 ms; 8 (14.0, 14.9 ms) and 128 (14.0,
/// 14.2 ms) did less well.
pub const DEFAULT_SUBMIT_EVERY: usize = 32;

/// The environment variable that sets [`GpuOptions::submit_every`].
pub const SUBMIT_EVERY_ENV: &str = "WGPU_MLKD_SUBMIT_EVERY";

/// `WGPU_MLKD_SUBMIT_EVERY` as a count; a value that is not one is reported and ignored (the adapter's default).
fn submit_every_from_env() -> Option<usize> {
    let v = std::env::var(SUBMIT_EVERY_ENV).ok()?;
    let parsed = v.trim().parse().ok();
    if parsed.is_none() {
        eprintln!("warning: {SUBMIT_EVERY_ENV}={v:?} is not a whole number of commands; ignored");
    }
    parsed
}

impl Default for GpuOptions {
    /// Any adapter, no memory limit, no profile, no pipeline cache, bind groups reused, submissions as the
    /// adapter suits ([`GpuOptions::submit_every`]).
    fn default() -> Self {
        GpuOptions {
            backend: None,
            adapter: None,
            memory_limit: None,
            profile: false,
            pipeline_cache: None,
            fresh_bind_groups: false,
            submit_every: None,
        }
    }
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
            fresh_bind_groups: !BindGroupCache::enabled_by_env(),
            submit_every: submit_every_from_env(),
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
    /// A discrete or integrated GPU, not a CPU driver (lavapipe, SwiftShader) or an unknown device.
    pub fn is_hardware_gpu(&self) -> bool {
        matches!(self.device_type.as_str(), "DiscreteGpu" | "IntegratedGpu")
    }

    fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let l = adapter.limits();
        AdapterSummary {
            features: useful_features(adapter, &info),
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

/// The adapter features some kernel or cache of wgpu-mlkd depends on, and the cooperative matrix
/// (tensor core) configurations wgpu offers on it, which no kernel uses yet (listed so that a device check
/// records what a GPU would offer one: M x N x K, input -> accumulator type).
fn useful_features(adapter: &wgpu::Adapter, info: &wgpu::AdapterInfo) -> Vec<String> {
    let features = adapter.features();
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
    if features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        out.push("timestamp-query".into());
    }
    if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        let configs: Vec<String> = adapter
            .cooperative_matrix_properties()
            .iter()
            .map(|p| {
                format!(
                    "{}x{}x{} {:?}->{:?}",
                    p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                )
            })
            .collect();
        out.push(format!("cooperative-matrix [{}]", configs.join(", ")));
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
    bind_groups: Arc<BindGroupCache>,
    /// The parameter blocks of a submission's dispatches, one aligned slot each, bound at dynamic offsets; kept
    /// (and grown) across submissions so that bind groups can be. Locked while a submission is encoded.
    params: Mutex<Option<wgpu::Buffer>>,
    /// Subgroup operations are enabled and every subgroup has exactly 8 invocations (lavapipe on AVX2):
    /// the matmul kernels of `shaders/matmul_sg.wgsl` assume that layout.
    pub(crate) subgroups_of_8: bool,
    /// Subgroup operations are enabled and no subgroup has fewer than 4 invocations (every desktop GPU):
    /// the quad attention kernel (`shaders/attention_quad.wgsl`) shuffles within groups of 4.
    subgroup_quads: bool,
    /// Shaders may use unpack2x16float (wgpu's `SHADER_F16_IN_F32`: every native backend, except lavapipe
    /// without shader-f16): the f16-weight kernels need it.
    unpacks_f16: bool,
    pending: Mutex<Vec<Command>>,
    /// [`GpuOptions::submit_every`].
    pub(crate) submit_every: usize,
    /// Times the host waited for the GPU (readbacks and [`Gpu::sync`]).
    waits: std::sync::atomic::AtomicU64,
    /// Command buffers submitted so far.
    submissions: std::sync::atomic::AtomicU64,
    /// Dispatches recorded so far, and the host's nanoseconds spent recording and encoding commands
    /// ([`Gpu::host_stats`]).
    dispatches: std::sync::atomic::AtomicU64,
    host_nanos: std::sync::atomic::AtomicU64,
    /// First validation/out-of-memory error the device reported outside an error scope, or a device loss.
    device_error: Arc<Mutex<Option<String>>>,
    /// Per-kernel times when profiling ([`GpuOptions::profile`]).
    profile: Option<Profile>,
}

/// What the host has spent on the GPU's commands ([`Gpu::host_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostStats {
    pub dispatches: u64,
    /// Bind groups made (the rest of the dispatches reused one).
    pub bind_groups: u64,
    /// Recording dispatches, and encoding and submitting every command; not waiting for the GPU.
    pub seconds: f64,
}

impl std::ops::Sub for HostStats {
    type Output = HostStats;
    fn sub(self, earlier: HostStats) -> HostStats {
        HostStats {
            dispatches: self.dispatches - earlier.dispatches,
            bind_groups: self.bind_groups - earlier.bind_groups,
            seconds: self.seconds - earlier.seconds,
        }
    }
}

/// The environment variable that turns the per-kernel profile on.
pub const PROFILE_ENV: &str = "WGPU_MLKD_PROFILE";

/// The per-kernel profile's state.
struct Profile {
    /// Held while a command runs, so that profiled commands run one at a time and the timer's query set and
    /// buffers serve one command at a time.
    times: Mutex<BTreeMap<String, KernelTime>>,
    /// Where the adapter has timestamp queries.
    timer: Option<PassTimer>,
}

/// One kernel's calls and summed times in the profile.
#[derive(Clone, Copy, Debug, Default)]
struct KernelTime {
    calls: u64,
    wall_seconds: f64,
    /// Calls that got a GPU time (all dispatches, unless the driver gave timestamps out of order).
    gpu_calls: u64,
    gpu_seconds: f64,
}

/// One line of the per-kernel profile ([`Gpu::profile_kernels`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelProfile {
    /// `shader::entry_point`, or `buffer copy`.
    pub name: String,
    pub calls: u64,
    /// Summed wall-clock time of the calls, each submitted and waited for alone: submission overhead included.
    pub wall_seconds: f64,
    /// Calls with a GPU time: every dispatch where the adapter has timestamp queries, no copy.
    pub gpu_calls: u64,
    /// Summed GPU time of those calls, from the timestamps written at the start and end of each compute pass;
    /// `None` when no call has one.
    pub gpu_seconds: Option<f64>,
}

/// Timestamp queries at the start and end of a compute pass, resolved and read back. Profiling runs one
/// command per submission and waits for it, so one pair of queries and one pair of buffers serve them all.
struct PassTimer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    ns_per_tick: f64,
}

impl PassTimer {
    /// The bytes of the two resolved timestamps.
    const BYTES: u64 = 2 * wgpu::QUERY_SIZE as u64;

    fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Option<PassTimer> {
        let ns_per_tick = f64::from(queue.get_timestamp_period());
        // wgpu gives 0 where timestamps are unsupported: then there is nothing to convert ticks with.
        if !(ns_per_tick.is_finite() && ns_per_tick > 0.0) {
            return None;
        }
        Some(PassTimer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps resolved"),
                size: Self::BYTES,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps readback"),
                size: Self::BYTES,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            ns_per_tick,
        })
    }

    fn pass_writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    /// Encodes the copy of the two timestamps into the readback buffer (after the pass has ended).
    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, Self::BYTES);
    }

    /// The seconds between the two timestamps of the pass just submitted, waiting for it; `None` when the end
    /// comes before the start (a driver's clock that wrapped or jumped).
    fn read_seconds(&self, device: &wgpu::Device) -> Result<Option<f64>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU's timestamps failed: {e}"))?;
        rx.recv()
            .map_err(|_| anyhow!("reading the GPU's timestamps was never answered"))?
            .map_err(|e| anyhow!("reading the GPU's timestamps failed: {e}"))?;
        let ticks = self
            .readback
            .get_mapped_range(..)
            .map(|view| bytemuck::pod_read_unaligned::<[u64; 2]>(&view[..Self::BYTES as usize]));
        // Unmapped whatever happened, so that the next command's timestamps can be read.
        self.readback.unmap();
        let ticks = ticks.map_err(|e| anyhow!("reading the GPU's timestamps failed: {e}"))?;
        Ok(ticks[1]
            .checked_sub(ticks[0])
            .map(|t| t as f64 * self.ns_per_tick * 1e-9))
    }
}

/// A recorded GPU command, encoded at the next flush.
pub(crate) enum Command {
    Dispatch {
        pipeline: Pipeline,
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
        let submit_every = (options.submit_every).unwrap_or(if summary.is_hardware_gpu() {
            DEFAULT_SUBMIT_EVERY
        } else {
            0
        });
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
        // Only for the profile: the feature costs nothing unused, but a device without it must open all the same.
        let timestamps = if options.profile {
            adapter.features() & wgpu::Features::TIMESTAMP_QUERY
        } else {
            wgpu::Features::empty()
        };
        let subgroups_of_8 = !subgroups.is_empty()
            && info.subgroup_min_size == 8
            && info.subgroup_max_size == 8
            && std::env::var_os("WGPU_MLKD_NO_SUBGROUPS").is_none();
        let subgroup_quads = !subgroups.is_empty()
            && info.subgroup_min_size >= 4
            && std::env::var_os("WGPU_MLKD_NO_SUBGROUPS").is_none();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpu-mlkd"),
            required_features: subgroups | pipeline_cache | timestamps,
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
        let bind_groups = Arc::new(BindGroupCache::new(!options.fresh_bind_groups));
        let pool = Arc::new(BufferPool::new(
            device.clone(),
            limits.clone(),
            memory_limit,
            bind_groups.clone(),
        ));
        let profile = options.profile.then(|| Profile {
            times: Mutex::default(),
            timer: if timestamps.is_empty() {
                None
            } else {
                PassTimer::new(&device, &queue)
            },
        });
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
                bind_groups,
                params: Mutex::new(None),
                subgroups_of_8,
                subgroup_quads,
                unpacks_f16,
                pending: Mutex::new(Vec::new()),
                submit_every,
                waits: Default::default(),
                submissions: Default::default(),
                dispatches: Default::default(),
                host_nanos: Default::default(),
                device_error,
                profile,
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

    /// True when subgroup operations are on and every subgroup has at least 4 invocations (set
    /// `WGPU_MLKD_NO_SUBGROUPS` to turn the kernels that need this off).
    pub fn subgroup_quads(&self) -> bool {
        self.inner.subgroup_quads
    }

    /// True where shaders may unpack f16 pairs (the kernels with f16 weights need it).
    pub fn unpacks_f16(&self) -> bool {
        self.inner.unpacks_f16
    }

    /// True on a discrete or integrated GPU, false on CPU drivers (lavapipe, SwiftShader, WARP) and unknown
    /// devices: kernels whose speed depends on real shared memory are chosen by it.
    pub fn is_hardware_gpu(&self) -> bool {
        self.inner.summary.is_hardware_gpu()
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

    /// Command buffers submitted so far: every flush with pending work, every readback, and every
    /// [`GpuOptions::submit_every`] commands recorded.
    pub fn submissions(&self) -> u64 {
        self.inner.submissions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many recorded commands go to the GPU in one submission without a flush (0: only at a flush or
    /// readback); see [`GpuOptions::submit_every`].
    pub fn submit_every(&self) -> usize {
        self.inner.submit_every
    }

    /// Times the host has waited for the GPU so far (every readback and [`Gpu::sync`]): a training step that
    /// reads back only its loss waits once.
    pub fn waits(&self) -> u64 {
        self.inner.waits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Dispatches recorded so far, bind groups made for them (one per new combination of layout and buffers
    /// while they are reused), and the host's seconds spent recording them and encoding and submitting every
    /// command (not waiting for the GPU): the engine's own overhead per kernel.
    pub fn host_stats(&self) -> HostStats {
        use std::sync::atomic::Ordering::Relaxed;
        HostStats {
            dispatches: self.inner.dispatches.load(Relaxed),
            bind_groups: self.inner.bind_groups.created(),
            seconds: self.inner.host_nanos.load(Relaxed) as f64 * 1e-9,
        }
    }

    fn add_host_time(&self, since: std::time::Instant) {
        let nanos = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.inner
            .host_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
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
        let started = std::time::Instant::now();
        let folded = super::fold_grid(groups);
        let max = self.inner.limits.max_compute_workgroups_per_dimension;
        if folded[0] > max || folded[1] > max {
            bail!(
                "{}::{entry}: grid of {groups} workgroups exceeds the adapter's {max} per dimension",
                shader.name
            );
        }
        let pipeline = self.inner.pipelines.get(shader, entry, constants)?;
        if buffers.len() != pipeline.layout.read_only.len() {
            bail!(
                "{}::{entry} binds {} storage buffers, but {} were given",
                shader.name,
                pipeline.layout.read_only.len(),
                buffers.len()
            );
        }
        if params.len() as u64 * 4 > PARAMS_BINDING_BYTES {
            bail!(
                "{}::{entry}: {} bytes of parameters, more than the {PARAMS_BINDING_BYTES} bound",
                shader.name,
                params.len() * 4
            );
        }
        self.inner.dispatches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cmd = Command::Dispatch {
            pipeline,
            shader: shader.name,
            label: entry,
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            params: params.to_vec(),
            groups: folded,
        };
        self.add_host_time(started);
        self.record(cmd)
    }

    /// Records a command; when profiling, runs it at once and times it (errors are the device's).
    pub(crate) fn record(&self, cmd: Command) -> Result<()> {
        let Some(profile) = &self.inner.profile else {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(cmd);
            if self.inner.submit_every > 0 && pending.len() >= self.inner.submit_every {
                // As `flush`, under the lock (submissions in recording order); errors surface at the next
                // flush or readback, which check the device.
                self.encode_and_submit(std::mem::take(&mut *pending), None);
            }
            return Ok(());
        };
        let mut times = profile.times.lock().unwrap_or_else(|p| p.into_inner());
        // Profiling: run the uploads staged before this command (an empty submission carries them), then this
        // command alone, and time it. Nothing is pending: every command is submitted here, never recorded.
        self.inner.queue.submit([]);
        let _ = self.inner.device.poll(wgpu::PollType::wait_indefinitely());
        let key = match &cmd {
            Command::Dispatch { shader, label, .. } => format!("{shader}::{label}"),
            Command::Copy { .. } => "buffer copy".to_string(),
        };
        let started = std::time::Instant::now();
        let timed = self.encode_and_submit(vec![cmd], profile.timer.as_ref());
        let done = self.sync();
        let wall_seconds = started.elapsed().as_secs_f64();
        let t = times.entry(key).or_default();
        t.calls += 1;
        t.wall_seconds += wall_seconds;
        done?;
        if let Some(timer) = profile.timer.as_ref().filter(|_| timed) {
            if let Some(s) = timer.read_seconds(&self.inner.device)? {
                t.gpu_calls += 1;
                t.gpu_seconds += s;
            }
        }
        Ok(())
    }

    /// Whether the per-kernel profile is on ([`GpuOptions::profile`]).
    pub fn profiling(&self) -> bool {
        self.inner.profile.is_some()
    }

    /// Forgets the kernel times so far (e.g. a warm-up's).
    pub fn profile_reset(&self) {
        if let Some(p) = &self.inner.profile {
            p.times.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Every kernel (and the buffer copies, as one line) profiled since the last [`Gpu::profile_reset`], by
    /// name; `None` when not profiling.
    pub fn profile_kernels(&self) -> Option<Vec<KernelProfile>> {
        let times = self
            .inner
            .profile
            .as_ref()?
            .times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(
            times
                .into_iter()
                .map(|(name, t)| KernelProfile {
                    name,
                    calls: t.calls,
                    wall_seconds: t.wall_seconds,
                    gpu_calls: t.gpu_calls,
                    gpu_seconds: (t.gpu_calls > 0).then_some(t.gpu_seconds),
                })
                .collect(),
        )
    }

    /// The GPU time of every kernel profiled since the last [`Gpu::profile_reset`], summed: how long the GPU
    /// was busy computing, without the submissions' overhead. `None` when not profiling or when the adapter
    /// has no timestamp queries.
    pub fn profile_gpu_seconds(&self) -> Option<f64> {
        let profile = self.inner.profile.as_ref()?;
        profile.timer.as_ref()?;
        let times = profile.times.lock().unwrap_or_else(|p| p.into_inner());
        Some(times.values().map(|t| t.gpu_seconds).sum())
    }

    /// The kernels by total time (GPU time where the adapter has timestamp queries, else wall-clock time), with
    /// calls, share and mean time, when profiling; `None` otherwise. The wall-clock time of a kernel is that of
    /// its own submission waited for, so it includes one submission's overhead; its GPU time does not.
    pub fn profile_report(&self) -> Option<String> {
        let timed = self.inner.profile.as_ref()?.timer.is_some();
        Some(profile_table(self.profile_kernels()?, timed))
    }

    /// Encodes every pending command into one command encoder and submits it. Does not wait.
    pub fn flush(&self) -> Result<()> {
        // The lock is held through the submission so that concurrent flushes reach the queue in the order
        // their commands were recorded.
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            self.encode_and_submit(std::mem::take(&mut *pending), None);
        }
        drop(pending);
        self.check_device_error()
    }

    /// Flushes and blocks until the GPU is idle.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.inner.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// With a `timer`, the first compute pass gets its start and end timestamps, resolved into the timer's
    /// readback buffer: for the profile, which submits one command at a time. Returns whether a pass was timed.
    fn encode_and_submit(&self, cmds: Vec<Command>, timer: Option<&PassTimer>) -> bool {
        let started = std::time::Instant::now();
        let device = &self.inner.device;
        // All parameter blocks of this submission live in the parameter buffer, one aligned slot each. Locked
        // until the submission: the next one's write must not come in between.
        let mut params_buffer = self.inner.params.lock().unwrap_or_else(|p| p.into_inner());
        let align = self.inner.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let mut offsets = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        for c in &cmds {
            if let Command::Dispatch { params, .. } = c {
                let start = bytes.len();
                offsets.push(start as u32);
                bytes.extend_from_slice(bytemuck::cast_slice(params));
                bytes.resize(start + (params.len() * 4).max(1).div_ceil(align) * align, 0);
            }
        }
        if let Some(&last) = offsets.last() {
            // Every binding window is PARAMS_BINDING_BYTES long, the last slot's included.
            let needed = (bytes.len() as u64).max(last as u64 + PARAMS_BINDING_BYTES);
            if params_buffer.as_ref().is_none_or(|b| b.size() < needed) {
                *params_buffer = Some(device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: needed.next_power_of_two().max(1 << 16),
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
                // The old buffer's bind groups can never be used again.
                self.inner.bind_groups.clear();
            }
            self.inner
                .queue
                .write_buffer(params_buffer.as_ref().expect("made above"), 0, &bytes);
        }

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        let mut offset = offsets.into_iter();
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        let mut untimed = timer;
        let mut timed = false;
        for cmd in cmds {
            match cmd {
                Command::Dispatch {
                    pipeline,
                    buffers,
                    groups,
                    ..
                } => {
                    let offset = offset.next().expect("one slot per dispatch");
                    let bind_group = self.inner.bind_groups.get(
                        device,
                        &pipeline.layout,
                        params_buffer.as_ref().expect("a parameter buffer"),
                        buffers,
                    );
                    let p = pass.get_or_insert_with(|| {
                        let timestamp_writes = untimed.take().map(PassTimer::pass_writes);
                        timed |= timestamp_writes.is_some();
                        encoder
                            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                                label: None,
                                timestamp_writes,
                            })
                            .forget_lifetime()
                    });
                    p.set_pipeline(&pipeline.compute);
                    p.set_bind_group(0, &bind_group, &[offset]);
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
        if let Some(timer) = timer.filter(|_| timed) {
            timer.resolve(&mut encoder);
        }
        self.inner.queue.submit([encoder.finish()]);
        drop(params_buffer);
        self.inner
            .submissions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.add_host_time(started);
        timed
    }
}

/// The profile's table (see [`Gpu::profile_report`]); `timed` when the adapter has timestamp queries.
fn profile_table(mut kernels: Vec<KernelProfile>, timed: bool) -> String {
    let gpu = |k: &KernelProfile| k.gpu_seconds.unwrap_or(0.0);
    kernels.sort_by(|a, b| match timed {
        true => gpu(b)
            .total_cmp(&gpu(a))
            .then(b.wall_seconds.total_cmp(&a.wall_seconds)),
        false => b.wall_seconds.total_cmp(&a.wall_seconds),
    });
    let gpu_total: f64 = kernels.iter().map(gpu).sum();
    let wall_total: f64 = kernels.iter().map(|k| k.wall_seconds).sum();
    let calls_total: u64 = kernels.iter().map(|k| k.calls).sum();
    let ms = |s: f64| format!("{:.3}", 1e3 * s);
    let us = |s: f64, n: u64| format!("{:.1}", 1e6 * s / n.max(1) as f64);
    let share = |s: f64, total: f64| format!("{:.1}%", 100.0 * s / total.max(1e-12));
    let none = || "-".to_string();
    let mut table: Vec<Vec<String>> = Vec::with_capacity(kernels.len() + 2);
    if timed {
        table.push(
            [
                "kernel",
                "calls",
                "GPU ms",
                "GPU share",
                "GPU mean us",
                "wall ms",
                "wall mean us",
            ]
            .map(String::from)
            .to_vec(),
        );
        for k in &kernels {
            let (gpu_ms, gpu_share, gpu_mean) = match k.gpu_seconds {
                Some(s) => (ms(s), share(s, gpu_total), us(s, k.gpu_calls)),
                None => (none(), none(), none()),
            };
            table.push(vec![
                k.name.clone(),
                k.calls.to_string(),
                gpu_ms,
                gpu_share,
                gpu_mean,
                ms(k.wall_seconds),
                us(k.wall_seconds, k.calls),
            ]);
        }
        table.push(vec![
            "total".into(),
            calls_total.to_string(),
            ms(gpu_total),
            String::new(),
            String::new(),
            ms(wall_total),
            String::new(),
        ]);
    } else {
        table.push(
            ["kernel", "calls", "wall ms", "share", "wall mean us"]
                .map(String::from)
                .to_vec(),
        );
        for k in &kernels {
            table.push(vec![
                k.name.clone(),
                k.calls.to_string(),
                ms(k.wall_seconds),
                share(k.wall_seconds, wall_total),
                us(k.wall_seconds, k.calls),
            ]);
        }
        table.push(vec![
            "total".into(),
            calls_total.to_string(),
            ms(wall_total),
            String::new(),
            String::new(),
        ]);
    }
    let mut out = String::new();
    if !timed {
        out += "no timestamp queries on this adapter: times are wall-clock per submitted kernel, overhead included\n";
    }
    out += &format_table(&table);
    out
}

/// The rows of `table` in columns: the first left-aligned, the others right-aligned, two spaces apart.
fn format_table(table: &[Vec<String>]) -> String {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let lines: Vec<String> = table
        .iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, &w))| match c {
                    0 => format!("{cell:<w$}"),
                    _ => format!("{cell:>w$}"),
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect();
    lines.join("\n")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str, calls: u64, wall_ms: f64, gpu_ms: Option<f64>) -> KernelProfile {
        KernelProfile {
            name: name.into(),
            calls,
            wall_seconds: wall_ms * 1e-3,
            gpu_calls: if gpu_ms.is_some() { calls } else { 0 },
            gpu_seconds: gpu_ms.map(|ms| ms * 1e-3),
        }
    }

    /// With GPU times the rows go by GPU time (not wall-clock time), copies last with no GPU columns, and the
    /// total row sums both; the means are per call, in microseconds.
    #[test]
    fn the_timed_profile_table_goes_by_gpu_time() {
        let kernels = vec![
            kernel("a::slow_to_submit", 4, 8.0, Some(0.4)),
            kernel("b::busy", 2, 3.0, Some(1.6)),
            kernel("buffer copy", 3, 0.3, None),
        ];
        let table = profile_table(kernels, true);
        eprintln!("{table}");
        let lines: Vec<&str> = table.lines().collect();
        let cells = |i: usize| -> Vec<&str> { lines[i].split_whitespace().collect() };
        assert_eq!(lines.len(), 5, "{table}");
        assert!(
            lines[0].starts_with("kernel") && lines[0].contains("GPU mean us"),
            "{table}"
        );
        assert_eq!(cells(1), ["b::busy", "2", "1.600", "80.0%", "800.0", "3.000", "1500.0"]);
        assert_eq!(
            cells(2),
            ["a::slow_to_submit", "4", "0.400", "20.0%", "100.0", "8.000", "2000.0"]
        );
        assert_eq!(cells(3), ["buffer", "copy", "3", "-", "-", "-", "0.300", "100.0"]);
        assert_eq!(cells(4), ["total", "9", "2.000", "11.300"]);
    }

    /// Without timestamp queries the table says so above it and goes by wall-clock time, as it always did.
    #[test]
    fn the_untimed_profile_table_says_its_times_are_wall_clock() {
        let kernels = vec![kernel("a::small", 1, 1.0, None), kernel("b::large", 2, 3.0, None)];
        let table = profile_table(kernels, false);
        eprintln!("{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "no timestamp queries on this adapter: times are wall-clock per submitted kernel, overhead included"
        );
        assert!(!lines[1].contains("GPU"), "{table}");
        let cells = |i: usize| -> Vec<&str> { lines[i].split_whitespace().collect() };
        assert_eq!(cells(2), ["b::large", "2", "3.000", "75.0%", "1500.0"]);
        assert_eq!(cells(3), ["a::small", "1", "1.000", "25.0%", "1000.0"]);
        assert_eq!(cells(4), ["total", "3", "4.000"]);
    }
}
