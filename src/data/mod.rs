//! Audio in: WAV reading, resampling to 16 kHz, per-utterance normalisation.

pub mod resample;
pub mod wav;
