//! Shader modules and compute pipelines, each compiled once per device and cached by a key that is also
//! the pipeline's label: `shader::entry` plus any overridden constants.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Result};

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
}

impl PipelineCache {
    pub(crate) fn new(device: wgpu::Device) -> Self {
        PipelineCache {
            device,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
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
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("compiling pipeline {key} failed: {e}");
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
