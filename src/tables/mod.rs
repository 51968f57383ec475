//! The tables more than one stage kind reads or writes: for each, its
//! schema, its row type, its reader and its builder, written once. A table
//! only one kind touches stays in that kind's file.

pub mod captions;
pub mod embeddings;
pub mod graphs;
pub mod image_keys;
pub mod metrics;
pub mod rejects;
pub mod sources;
pub mod triplets;
pub mod weights;
