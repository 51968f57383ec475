//! genecis: the GeneCIS benchmark and training recipe as a pipeline of
//! Arrow/Parquet stages. ARCHITECTURE.md says where everything is.

pub mod devtools;
pub mod embed;
pub mod error;
pub mod import_parses;
pub mod ingest;
pub mod manifest;
pub mod mine;
pub mod model;
pub mod parse;
pub mod pretrain;
pub mod progress;
pub mod runner;
pub mod score;
pub mod sql;
pub mod stage;
pub mod store;
pub mod synth;
pub mod templates;
pub mod train;

pub use error::{Error, Result};
