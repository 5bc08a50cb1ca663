//! The `wgpu-mlkd` command line: one file per subcommand.

mod bench;
mod cache_merge;
mod cache_show;
mod cache_teacher;
mod dataset;
mod demo;
mod devices;
mod eval;
mod extract;
mod infer;
mod make_teacher;
mod ser_train;
mod synth_data;
mod train;

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
    /// List the GPU adapters wgpu can see, with their backend, type, limits and features
    Devices(devices::Args),
    /// Run the wav2vec 2.0 teacher on a WAV file and save its hidden states as safetensors
    Extract(extract::Args),
    /// Cache the teacher's target layers for every utterance of a data set (resumable)
    CacheTeacher(cache_teacher::Args),
    /// Summarise a teacher cache; --verify checks it; --id --out exports one utterance
    CacheShow(cache_show::Args),
    /// Join caches made with `cache-teacher --shard K/N` into one verified cache
    CacheMerge(cache_merge::Args),
    /// Distil the teacher into a small student that predicts its clean layers from noisy speech (resumable)
    Train(Box<train::Args>),
    /// Time the teacher forward or a training step on the selected adapter (for benches/compare.sh);
    /// WGPU_MLKD_PROFILE=1 adds a per-kernel profile of the timed runs
    Bench(bench::Args),
    /// Train the emotion classifier on a frozen teacher or student (multi-condition with --noise)
    SerTrain(ser_train::Args),
    /// Score SER models on a data set, clean and in noise: WA / UA per noise type and SNR
    Eval(eval::Args),
    /// Predict the emotion of a recording (or of each segment) with a SER model
    Infer(infer::Args),
    /// Write a seeded synthetic emotional-speech corpus (EmoDB layout, 4 emotions) for the demo and tests
    SynthData(synth_data::Args),
    /// Pretrain a small wav2vec 2.0 teacher (masked log-mel reconstruction, no labels) on clean speech
    MakeTeacher(make_teacher::Args),
    /// The whole pipeline in one go, nothing to download: synthetic speech, the embedded demo teacher,
    /// distillation, emotion classifiers, and the teacher-versus-student table in unseen noise
    Demo(demo::Args),
}

impl Cli {
    fn gpu_options(&self) -> GpuOptions {
        GpuOptions::from_env().with_overrides(self.backend, self.adapter.clone())
    }

    fn open_gpu(&self) -> Result<Gpu> {
        Gpu::new(&self.gpu_options())
    }
}

/// The noise bank of the `--noise` / `--noise-gen` options every command shares: folders (searched
/// recursively) or WAV files, `gen:NAME` entries among them, and generator names; `None` when none is given.
pub(crate) fn noise_bank(
    noise: &[std::path::PathBuf],
    generators: &[String],
    type_from_dir: bool,
    seed: u64,
) -> Result<Option<crate::data::noise::NoiseBank>> {
    let mut dirs = Vec::new();
    let mut gens: Vec<String> = generators.iter().map(|g| g.trim().to_string()).collect();
    for n in noise {
        match n.to_str().and_then(|s| s.strip_prefix("gen:")) {
            Some(g) => gens.push(g.to_string()),
            None => dirs.push(n.clone()),
        }
    }
    gens.retain(|g| !g.is_empty());
    if dirs.is_empty() && gens.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::data::noise::NoiseBank::load(
        &dirs,
        &gens,
        type_from_dir,
        seed,
    )?))
}

pub fn run() -> Result<()> {
    dispatch(&Cli::parse())
}

/// Runs the parsed command line (the demo runs its steps through here too).
fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Dataset(args) => dataset::run(cli, args),
        Command::Devices(args) => devices::run(cli, args),
        Command::Extract(args) => extract::run(cli, args),
        Command::CacheTeacher(args) => cache_teacher::run(cli, args),
        Command::CacheShow(args) => cache_show::run(cli, args),
        Command::CacheMerge(args) => cache_merge::run(cli, args),
        Command::Train(args) => train::run(cli, args),
        Command::Bench(args) => bench::run(cli, args),
        Command::SerTrain(args) => ser_train::run(cli, args),
        Command::Eval(args) => eval::run(cli, args),
        Command::Infer(args) => infer::run(cli, args),
        Command::SynthData(args) => synth_data::run(cli, args),
        Command::MakeTeacher(args) => make_teacher::run(cli, args),
        Command::Demo(args) => demo::run(cli, args),
    }
}
