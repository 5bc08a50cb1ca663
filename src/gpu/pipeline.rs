//! Shader modules and compute pipelines, each compiled once per device and cached by a key that is also
//! the pipeline's label: `shader::entry` plus any overridden constants; and the driver's compiled pipelines,
//! kept on disk between runs where the backend supports it ([`DiskCache`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};

/// One WGSL file from `shaders/`, embedded in the binary.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// `shader!("gelu")` embeds `shaders/gelu.wgsl` followed by `shaders/common.wgsl`, the functions shared by
/// several kernels (WGSL has no includes; appended, so the file's own line numbers hold in error messages).
/// `shader!("matmul", "matmul_common")` appends `shaders/matmul_common.wgsl` before `common.wgsl`: a part
/// that several modules of one op share. (`tests/shaders_validate.rs` and the pipeline tests compose the files
/// the same way: `SHADER_PARTS` lists the parts.)
#[macro_export]
macro_rules! shader {
    ($name:literal $(, $part:literal)*) => {
        $crate::gpu::Shader {
            name: $name,
            source: concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl")),
                $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $part, ".wgsl")),)*
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common.wgsl"))
            ),
        }
    };
}

/// The shader files that are parts of other modules rather than modules of their own, and the modules that
/// append them (see [`shader!`]), for the tests that validate every file as the engine compiles it.
pub const SHADER_PARTS: &[(&str, &[&str])] = &[("matmul_common.wgsl", &["matmul.wgsl", "matmul_sg.wgsl"])];

/// The source of shader file `file` (a name in `shaders/`, whose text is `text`) as [`shader!`] compiles it:
/// with its parts and `common_text` appended; `None` for a part itself (validated inside its modules).
pub fn compose_shader_file(file: &str, text: &str, common_text: &str) -> Option<String> {
    if SHADER_PARTS.iter().any(|(part, _)| *part == file) {
        return None;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut source = text.to_string();
    for (part, modules) in SHADER_PARTS {
        if modules.contains(&file) {
            source += &std::fs::read_to_string(dir.join(part)).expect("a shader part beside its module");
        }
    }
    Some(source + common_text)
}

/// Bytes of the parameter block every dispatch binds at binding 0 (a window of the shared parameter buffer,
/// placed by a dynamic offset): a kernel's uniform struct must fit in it.
pub(crate) const PARAMS_BINDING_BYTES: u64 = 256;

/// A compiled pipeline and the layout of what it binds.
#[derive(Clone)]
pub(crate) struct Pipeline {
    pub(crate) compute: wgpu::ComputePipeline,
    pub(crate) layout: Arc<BindingLayout>,
}

/// What an entry point binds, read from its shader: binding 0 the uniform parameter block (at a dynamic
/// offset, so one bind group serves every dispatch on the same buffers), bindings 1..=n storage buffers.
/// Explicit rather than wgpu's automatic layout, which has no dynamic offsets; pipelines that bind the same
/// kinds of buffers share one layout, and so their bind groups.
pub(crate) struct BindingLayout {
    pub(crate) bind_group_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    /// Whether each storage binding 1..=n is read-only.
    pub(crate) read_only: Vec<bool>,
}

/// A shader module, and naga's view of it for reading each entry point's bindings.
struct Module {
    module: wgpu::ShaderModule,
    ir: naga::Module,
    info: naga::valid::ModuleInfo,
}

/// The cache key of a pipeline: shader, entry point and overridden constants (as bits, so it is `Eq`). Built
/// without formatting a string, since every dispatch looks its pipeline up.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
}

pub(crate) struct PipelineCache {
    device: wgpu::Device,
    modules: Mutex<HashMap<&'static str, Arc<Module>>>,
    pipelines: Mutex<HashMap<PipelineKey, Pipeline>>,
    /// One layout per kind of binding list (the storage bindings' read-only flags), with its pipeline layout.
    layouts: Mutex<HashMap<Vec<bool>, Arc<BindingLayout>>>,
    disk: Option<DiskCache>,
}

impl PipelineCache {
    pub(crate) fn new(device: wgpu::Device, disk: Option<DiskCache>) -> Self {
        PipelineCache {
            device,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            layouts: Mutex::default(),
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
    ) -> Result<Pipeline> {
        let key = PipelineKey {
            shader: shader.name,
            entry,
            constants: constants.iter().map(|&(k, v)| (k, v.to_bits())).collect(),
        };
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let mut label = format!("{}::{entry}", shader.name);
        for (k, v) in constants {
            label.push_str(&format!(" {k}={v}"));
        }
        let module = self.module(shader)?;
        let read_only = entry_bindings(&module.ir, &module.info, entry).with_context(|| {
            format!(
                "shaders/{}.wgsl, entry point {entry}: unsupported bindings",
                shader.name
            )
        })?;
        let layout = self.layout(read_only);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let compute = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&layout.pipeline_layout),
            module: &module.module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: self.disk.as_ref().map(|d| &d.cache),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("compiling pipeline {label} failed: {e}");
        }
        if let Some(d) = &self.disk {
            d.dirty.store(true, Ordering::Relaxed);
        }
        let pipeline = Pipeline { compute, layout };
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// The layout for storage bindings with these read-only flags, made on first use.
    fn layout(&self, read_only: Vec<bool>) -> Arc<BindingLayout> {
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(layout) = layouts.get(&read_only) {
            return layout.clone();
        }
        let buffer = |binding: u32, ty: wgpu::BufferBindingType, has_dynamic_offset: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![buffer(0, wgpu::BufferBindingType::Uniform, true)];
        for (i, &read_only) in read_only.iter().enumerate() {
            entries.push(buffer(
                i as u32 + 1,
                wgpu::BufferBindingType::Storage { read_only },
                false,
            ));
        }
        let bind_group_layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        let layout = Arc::new(BindingLayout {
            bind_group_layout,
            pipeline_layout,
            read_only: read_only.clone(),
        });
        layouts.insert(read_only, layout.clone());
        layout
    }

    fn module(&self, shader: &'static Shader) -> Result<Arc<Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(shader.name) {
            return Ok(m.clone());
        }
        // naga's own reading first: its errors name the line, and its analysis gives the bindings.
        let ir = naga::front::wgsl::parse_str(shader.source).map_err(|e| {
            anyhow!(
                "shaders/{}.wgsl does not compile: {}",
                shader.name,
                e.emit_to_string(shader.source)
            )
        })?;
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&ir)
            .map_err(|e| {
                anyhow!(
                    "shaders/{}.wgsl does not compile: {}",
                    shader.name,
                    e.emit_to_string(shader.source)
                )
            })?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("shaders/{}.wgsl does not compile: {e}", shader.name);
        }
        let module = Arc::new(Module { module, ir, info });
        modules.insert(shader.name, module.clone());
        Ok(module)
    }
}

/// The read-only flag of each storage binding 1..=n an entry point uses, checking that it binds what every
/// dispatch supplies: a uniform block of at most [`PARAMS_BINDING_BYTES`] at binding 0 and storage buffers at
/// 1..=n of group 0. Read as wgpu's automatic layout would: only the globals the entry point (or a function it
/// calls) uses, with their declared access.
fn entry_bindings(module: &naga::Module, info: &naga::valid::ModuleInfo, entry: &str) -> Result<Vec<bool>> {
    let index = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .ok_or_else(|| anyhow!("no entry point named {entry}"))?;
    let uses = info.get_entry_point(index);
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| anyhow!("cannot lay out the shader's types: {e}"))?;
    let mut uniform = false;
    let mut storage: BTreeMap<u32, bool> = BTreeMap::new();
    for (handle, global) in module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        let Some(binding) = &global.binding else {
            continue;
        };
        let name = global.name.as_deref().unwrap_or("?");
        if binding.group != 0 {
            bail!("{name} is in group {}; every binding must be in group 0", binding.group);
        }
        match global.space {
            naga::AddressSpace::Uniform if binding.binding == 0 => {
                let bytes = layouter[global.ty].size as u64;
                if bytes > PARAMS_BINDING_BYTES {
                    bail!("the parameter block {name} is {bytes} bytes, more than the {PARAMS_BINDING_BYTES} bound");
                }
                uniform = true;
            }
            naga::AddressSpace::Storage { access } if binding.binding > 0 => {
                storage.insert(binding.binding, !access.contains(naga::StorageAccess::STORE));
            }
            other => bail!(
                "{name} at binding {} is in address space {other:?}; binding 0 must be the uniform parameter block \
                 and the others storage buffers",
                binding.binding
            ),
        }
    }
    if !uniform {
        bail!("binding 0 (the uniform parameter block) is not used");
    }
    if storage.keys().copied().ne(1..=storage.len() as u32) {
        bail!(
            "the storage bindings used are {:?}; they must be 1..=n with no gaps",
            storage.keys().collect::<Vec<_>>()
        );
    }
    Ok(storage.into_values().collect())
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

    fn bindings_of(source: &str, entry: &str) -> Result<Vec<bool>> {
        let module = naga::front::wgsl::parse_str(source).unwrap();
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap();
        entry_bindings(&module, &info, entry)
    }

    /// An entry point's layout lists what it uses, through the functions it calls, with the declared access;
    /// bindings the dispatch cannot supply are errors that say what is wrong.
    #[test]
    fn entry_bindings_are_read_from_the_shader() {
        let source = r#"
            struct P { n: u32, alpha: f32 }
            struct Big { a: array<vec4<f32>, 17> }
            @group(0) @binding(0) var<uniform> p: P;
            @group(0) @binding(1) var<storage, read> a: array<f32>;
            @group(0) @binding(2) var<storage, read_write> b: array<f32>;
            @group(0) @binding(3) var<storage, read_write> c: array<f32>;
            @group(1) @binding(1) var<storage, read> elsewhere: array<f32>;
            @group(0) @binding(0) var<uniform> big: Big;
            fn load(i: u32) -> f32 { return a[i]; }
            @compute @workgroup_size(1) fn ok() { b[0] = load(1u) * p.alpha; }
            @compute @workgroup_size(1) fn all_three() { c[0] = load(0u) + b[0] + f32(p.n); }
            @compute @workgroup_size(1) fn gap() { c[0] = f32(p.n); }
            @compute @workgroup_size(1) fn no_params() { b[0] = a[0]; }
            @compute @workgroup_size(1) fn group_1() { b[0] = elsewhere[0] * p.alpha; }
            @compute @workgroup_size(1) fn too_big() { b[0] = big.a[3].x + a[0]; }
        "#;
        assert_eq!(bindings_of(source, "ok").unwrap(), vec![true, false]);
        assert_eq!(bindings_of(source, "all_three").unwrap(), vec![true, false, false]);
        for (entry, says) in [
            ("gap", "must be 1..=n"),
            ("no_params", "not used"),
            ("group_1", "group 1"),
            ("too_big", "272 bytes"),
            ("missing", "no entry point"),
        ] {
            let e = bindings_of(source, entry).unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
    }

    /// Every entry point of every shader binds what a dispatch supplies (checked here for all of them, since
    /// some only run on GPUs this machine may not have).
    #[test]
    fn every_shader_entry_point_has_a_dispatchable_layout() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        let common = std::fs::read_to_string(dir.join("common.wgsl")).unwrap();
        let mut entries = 0;
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_none_or(|e| e != "wgsl") || path.ends_with("common.wgsl") {
                continue;
            }
            let name = path.file_name().unwrap().to_str().unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let Some(source) = compose_shader_file(name, &text, &common) else {
                continue; // a part: its modules' entry points cover it
            };
            let module = naga::front::wgsl::parse_str(&source).unwrap();
            for e in &module.entry_points {
                bindings_of(&source, &e.name).unwrap_or_else(|err| panic!("{}::{}: {err:#}", path.display(), e.name));
                entries += 1;
            }
        }
        assert!(entries > 50, "{entries}");
    }

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
