//! Audio in: WAV reading and writing (`wav`), band-limited resampling to 16 kHz (`resample`), and
//! the per-utterance zero-mean unit-variance normalisation wav2vec 2.0 expects
//! (`wav::normalize`). `wav::load_16k` chains reading and resampling; `wav::open_16k` does the same
//! piece by piece, for long files.

pub mod cache;
pub mod dataset;
pub mod mel;
pub mod noise;
pub mod resample;
pub mod synth;
pub mod wav;
