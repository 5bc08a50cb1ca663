//! `wgpu-mlkd synth-data`: a seeded synthetic emotional-speech corpus in EmoDB layout
//! (`crate::data::synth` describes the voice and the prosody).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::Cli;
use crate::data::synth::{write_dataset, SynthConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (the audio goes to OUT/wav/, EmoDB-named, 16-bit 16 kHz)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of speakers (even ids male, odd female)
    #[arg(long, default_value_t = 8, value_name = "N")]
    speakers: usize,
    /// Id of the first speaker (speakers first..first+N; ids are 2 digits)
    #[arg(long, default_value_t = 0, value_name = "ID")]
    first_speaker: usize,
    /// Utterances per emotion and speaker (4 emotions: anger, happiness, sadness, neutral)
    #[arg(long, default_value_t = 20, value_name = "M")]
    per_class: usize,
    /// Approximate utterance length at neutral tempo (sad speech is slower, angry faster)
    #[arg(long, default_value_t = 2.0, value_name = "S")]
    seconds: f64,
    /// Seed of the speaker population and of every utterance
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
}

pub fn run(_cli: &Cli, args: &Args) -> Result<()> {
    let cfg = SynthConfig {
        speakers: args.speakers,
        first_speaker: args.first_speaker,
        per_class: args.per_class,
        seconds: args.seconds,
        seed: args.seed,
    };
    cfg.validate()?;
    let total = (cfg.speakers * cfg.per_class * 4) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} utterances")
            .expect("valid template"),
    );
    let started = Instant::now();
    let (n, secs) = write_dataset(&args.out, &cfg, |k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    eprintln!(
        "synth-data: wrote {n} utterances ({:.1} min of audio, {} speakers x 4 emotions x {}) to {} in {:.1} s",
        secs / 60.0,
        cfg.speakers,
        cfg.per_class,
        args.out.join("wav").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
