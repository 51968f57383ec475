//! `weights(role, file, format, bytes, epoch, select_by, value)`: the
//! files a training stage wrote (role `backbone`, `combiner`), read by
//! embed and score.
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};

pub(crate) static WEIGHTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("select_by", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]))
});

pub(crate) type WeightsRow = (String, String, String, u64, u32, String, f64);

pub(crate) fn weights_batch(rows: &[WeightsRow]) -> Result<RecordBatch> {
    let mut role = StringBuilder::new();
    let mut file = StringBuilder::new();
    let mut format = StringBuilder::new();
    let mut bytes = UInt64Builder::new();
    let mut epoch = UInt32Builder::new();
    let mut by = StringBuilder::new();
    let mut value = Float64Builder::new();
    for r in rows {
        role.append_value(&r.0);
        file.append_value(&r.1);
        format.append_value(&r.2);
        bytes.append_value(r.3);
        epoch.append_value(r.4);
        by.append_value(&r.5);
        value.append_value(r.6);
    }
    Ok(RecordBatch::try_new(
        WEIGHTS_SCHEMA.clone(),
        vec![
            Arc::new(role.finish()) as ArrayRef,
            Arc::new(file.finish()),
            Arc::new(format.finish()),
            Arc::new(bytes.finish()),
            Arc::new(epoch.finish()),
            Arc::new(by.finish()),
            Arc::new(value.finish()),
        ],
    )?)
}

/// Where a `weights` table says `role`'s file is, if it lists one.
pub(crate) fn weights_file(dir: &Path, role: &str) -> Result<Option<PathBuf>> {
    let p = crate::framework::store::role_file(dir, role, "file")?;
    if let Some(p) = p.as_ref().filter(|p| !p.is_file()) {
        return Err(Error::Data(format!(
            "{} is listed in {} but missing; rerun the train stage",
            p.display(),
            dir.display()
        )));
    }
    Ok(p)
}
