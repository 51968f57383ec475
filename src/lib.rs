//! genecis: the GeneCIS benchmark and training recipe as a pipeline of
//! Arrow/Parquet stages. ARCHITECTURE.md says where everything is.
//!
//! Layers, each depending only on those below it:
//! `cli` (commands) -> `stages` (the stage kinds and their registry) ->
//! `tables`, `eval` (what more than one kind reads or computes) ->
//! `framework` (manifest, plan, runner, store, SQL, the stage contract) and
//! `model` (CLIP, the Combiner, optimisation on libtorch) -> `error`, `rng`.

pub mod cli;
pub mod error;
pub mod eval;
pub mod framework;
pub mod model;
pub mod rng;
pub mod stages;
pub mod tables;

pub use error::{Error, Result};
