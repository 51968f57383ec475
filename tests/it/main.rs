//! Integration tests: one binary, one module per area.

mod common;
mod dist;
mod eval;
mod families;
mod global;
mod hostile;
mod import;
mod ingest;
mod inversion;
mod kit;
mod manifest;
mod mine;
mod model;
mod parse;
mod report;
mod run;
mod sql;
mod store;
mod synth;
mod train;
