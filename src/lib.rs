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

/// Defines a test module `$name` that runs `$body` once per device
/// libtorch sees: `$name::cpu` always, `$name::cuda` on CUDA device 0, which
/// on a machine without CUDA passes with a printed notice that it skipped.
/// For the model, training and ranking tests (as candle's `test_device!`).
#[doc(hidden)]
#[macro_export]
macro_rules! test_device {
    ($name:ident, |$device:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($device: tch::Device) $body

            #[test]
            fn cpu() {
                run(tch::Device::Cpu)
            }

            #[test]
            fn cuda() {
                if tch::Cuda::is_available() {
                    run(tch::Device::Cuda(0))
                } else {
                    eprintln!(
                        "{}::cuda skipped: libtorch sees no CUDA device",
                        module_path!()
                    );
                }
            }
        }
    };
}
