//! `sources(role, path)`: the files a generating stage (`synth`) made, by
//! role, for ingest and templates to read.
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

pub(crate) static SOURCES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
    ]))
});

/// The `path` of `role` in a `sources` table, resolved against its stage
/// folder.
pub(crate) fn source(dir: &Path, role: &str) -> Result<Option<PathBuf>> {
    crate::framework::store::role_file(dir, role, "path")
}
