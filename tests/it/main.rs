//! Integration tests: one binary, one module per area.

mod common;
mod ingest;
mod manifest;
mod run;
mod sql;
