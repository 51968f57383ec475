//! The pipeline framework: manifests become validated plans, the runner
//! runs and commits stages into a run folder, and SQL reads it back. It
//! knows stage kinds only through the [`stage::Stage`] contract and the
//! registry it is handed.

pub mod commit;
pub(crate) mod manifest;
pub(crate) mod progress;
pub mod ranks;
pub mod runner;
pub mod sql;
pub(crate) mod stage;
pub mod store;
pub(crate) mod tabledef;
