//! `rejects(source, line_number?, reason, raw?)`: input records a stage
//! could not use, each with why (ingest, import-parses, templates).
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Int64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

/// The columns; `line_number` is the record's place in its file.
pub(crate) static REJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("line_number", DataType::Int64, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, true),
    ]))
});

/// Builder of `rejects` rows.
#[derive(Default)]
pub(crate) struct RejectRows {
    source: StringBuilder,
    line: Int64Builder,
    reason: StringBuilder,
    raw: StringBuilder,
}

impl RejectRows {
    pub(crate) fn push(&mut self, source: &str, line: Option<i64>, reason: &str, raw: &str) {
        self.source.append_value(source);
        self.line.append_option(line);
        self.reason.append_value(reason);
        self.raw.append_value(raw);
    }

    pub(crate) fn finish(mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            REJECTS_SCHEMA.clone(),
            vec![
                Arc::new(self.source.finish()) as ArrayRef,
                Arc::new(self.line.finish()),
                Arc::new(self.reason.finish()),
                Arc::new(self.raw.finish()),
            ],
        )?)
    }
}
