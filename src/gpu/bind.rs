//! Bind groups kept across submissions.
//!
//! Creating a bind group costs more host time than recording the dispatch that uses it (8-30 us on lavapipe,
//! where the whole dispatch costs ~26 us of GPU time). A model binds the same few buffers again and again
//! (the pool hands the same buffers back every forward, and the parameter block sits in one buffer at a
//! dynamic offset), so a bind group is made once per (layout, buffers) and looked up after that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::pipeline::{BindingLayout, PARAMS_BINDING_BYTES};

/// Most bind groups kept; past it the cache starts again (a bound that only a workload whose buffers never
/// repeat reaches, e.g. inputs of ever new lengths).
const CAPACITY: usize = 4096;

/// The environment variable that turns the cache off (every dispatch makes its own bind group): for measuring
/// what it saves.
pub const NO_BIND_GROUP_CACHE_ENV: &str = "WGPU_MLKD_NO_BIND_GROUP_CACHE";

/// A bind group's identity: its layout, the parameter buffer and the storage buffers in binding order. The key
/// holds the buffers, so none of them can be freed (and its identity reused) while its bind group is cached.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    layout: usize,
    params: wgpu::Buffer,
    buffers: Vec<wgpu::Buffer>,
}

pub(crate) struct BindGroupCache {
    groups: Mutex<HashMap<Key, wgpu::BindGroup>>,
    enabled: bool,
    /// Bind groups created so far (cached or not).
    created: AtomicU64,
}

impl BindGroupCache {
    pub(crate) fn new(enabled: bool) -> Self {
        BindGroupCache {
            groups: Mutex::default(),
            enabled,
            created: AtomicU64::new(0),
        }
    }

    /// Whether the environment leaves the cache on.
    pub(crate) fn enabled_by_env() -> bool {
        std::env::var_os(NO_BIND_GROUP_CACHE_ENV).is_none_or(|v| v.is_empty() || v == "0")
    }

    /// The bind group of `layout` with `params` (at a dynamic offset) at binding 0 and `buffers` at 1..=n.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        layout: &Arc<BindingLayout>,
        params: &wgpu::Buffer,
        buffers: Vec<wgpu::Buffer>,
    ) -> wgpu::BindGroup {
        if !self.enabled {
            return self.create(device, layout, params, &buffers);
        }
        let key = Key {
            layout: Arc::as_ptr(layout) as usize,
            params: params.clone(),
            buffers,
        };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(group) = groups.get(&key) {
            return group.clone();
        }
        if groups.len() >= CAPACITY {
            groups.clear();
        }
        let group = self.create(device, layout, params, &key.buffers);
        groups.insert(key, group.clone());
        group
    }

    fn create(
        &self,
        device: &wgpu::Device,
        layout: &BindingLayout,
        params: &wgpu::Buffer,
        buffers: &[wgpu::Buffer],
    ) -> wgpu::BindGroup {
        self.created.fetch_add(1, Ordering::Relaxed);
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: params,
                offset: 0,
                size: std::num::NonZeroU64::new(PARAMS_BINDING_BYTES),
            }),
        });
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout.bind_group_layout,
            entries: &entries,
        })
    }

    /// Drops every cached bind group, and with them the cache's hold on their buffers (so that memory the
    /// pool lets go of is really freed).
    pub(crate) fn clear(&self) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Bind groups created so far.
    pub(crate) fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}
