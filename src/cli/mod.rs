//! The `wgpu-mlkd` command line: one file per subcommand.

mod cache_merge;
mod cache_show;
mod cache_teacher;
mod dataset;
mod devices;
mod extract;
mod make_teacher;
mod synth_data;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::gpu::{BackendChoice, Gpu, GpuOptions};

#[derive(Parser)]
#[command(
    name = "wgpu-mlkd",
    version,
    about = "Noise-robust speech emotion recognition by multi-level knowledge \
distillation, on any GPU through wgpu (Vulkan, Metal, DX12; software Vulkan where there is no GPU)"
)]
pub struct Cli {
    /// Graphics API to use [env: WGPU_BACKEND]
    #[arg(long, global = true, value_enum)]
    backend: Option<BackendChoice>,
    /// Use the adapter whose name contains this text (case-insensitive) [env: WGPU_ADAPTER_NAME]
    #[arg(long, global = true, value_name = "NAME-SUBSTRING")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a dataset (EmoDB or IEMOCAP folder, or CSV manifest) and list files it cannot use
    Dataset(dataset::Args),
    /// List the GPU adapters wgpu can see, with their backend, type and limits
    Devices(devices::Args),
    /// Run the wav2vec 2.0 teacher on a WAV file and save its hidden states as safetensors
    Extract(extract::Args),
    /// Cache the teacher's target layers for every utterance of a data set (resumable)
    CacheTeacher(cache_teacher::Args),
    /// Summarise a teacher cache; --verify checks it; --id --out exports one utterance
    CacheShow(cache_show::Args),
    /// Join caches made with `cache-teacher --shard K/N` into one verified cache
    CacheMerge(cache_merge::Args),
    /// Write a seeded synthetic emotional-speech corpus (EmoDB layout, 4 emotions) for the demo and tests
    SynthData(synth_data::Args),
    /// Pretrain a small wav2vec 2.0 teacher (masked log-mel reconstruction, no labels) on clean speech
    MakeTeacher(make_teacher::Args),
}

impl Cli {
    fn gpu_options(&self) -> GpuOptions {
        GpuOptions::from_env().with_overrides(self.backend, self.adapter.clone())
    }

    fn open_gpu(&self) -> Result<Gpu> {
        Gpu::new(&self.gpu_options())
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Dataset(args) => dataset::run(&cli, args),
        Command::Devices(args) => devices::run(&cli, args),
        Command::Extract(args) => extract::run(&cli, args),
        Command::CacheTeacher(args) => cache_teacher::run(&cli, args),
        Command::CacheShow(args) => cache_show::run(&cli, args),
        Command::CacheMerge(args) => cache_merge::run(&cli, args),
        Command::SynthData(args) => synth_data::run(&cli, args),
        Command::MakeTeacher(args) => make_teacher::run(&cli, args),
    }
}
