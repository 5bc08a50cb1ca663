//! One file per op family: the launcher, its CPU reference (f64) and its tests.

pub mod elementwise;
#[cfg(test)]
pub mod testing;
