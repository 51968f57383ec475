//! The tables more than one stage kind reads or writes: for each, its
//! schema, its row type, its reader and its builder, written once. A table
//! only one kind touches stays in that kind's file.

pub(crate) mod captions;
pub(crate) mod embeddings;
pub(crate) mod graphs;
pub(crate) mod image_keys;
pub(crate) mod imported;
pub(crate) mod metrics;
pub(crate) mod rejects;
pub(crate) mod sources;
pub(crate) mod triplets;
pub(crate) mod weights;
