//! `wgpu-mlkd devices`: what wgpu sees, and which adapter would be chosen.

use anyhow::{bail, Result};

use super::Cli;
use crate::gpu::Gpu;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(cli: &Cli, _args: &Args) -> Result<()> {
    let options = cli.gpu_options();
    let adapters = Gpu::adapters(&options);
    if adapters.is_empty() {
        // Gpu::new words the error with the install hint.
        Gpu::new(&options)?;
        bail!("no adapter found");
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("[{i}] {a}");
    }
    match Gpu::new(&options) {
        Ok(gpu) => {
            println!("selected: {} ({})", gpu.adapter().name, gpu.adapter().backend);
            match gpu.pipeline_cache_file() {
                Some(f) => println!("pipeline cache: {}", f.display()),
                None => println!("pipeline cache: none (off, or the backend has none)"),
            }
        }
        Err(e) => println!("no adapter selected: {e:#}"),
    }
    Ok(())
}
