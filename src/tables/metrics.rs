//! `train_metrics` / `pretrain_metrics(epoch, step, split, metric, value,
//! lr)`: what the training stages log per epoch.
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

pub(crate) static TRAIN_METRICS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("lr", DataType::Float64, false),
    ]))
});

/// Metric rows kept per epoch: (epoch, step, split, metric, value, lr).
pub(crate) type MetricRow = (u32, u64, String, String, f64, f64);

pub(crate) fn metrics_batch(rows: &[MetricRow]) -> Result<RecordBatch> {
    let mut e = UInt32Builder::new();
    let mut s = UInt64Builder::new();
    let mut sp = StringBuilder::new();
    let mut m = StringBuilder::new();
    let mut v = Float64Builder::new();
    let mut lr = Float64Builder::new();
    for r in rows {
        e.append_value(r.0);
        s.append_value(r.1);
        sp.append_value(&r.2);
        m.append_value(&r.3);
        v.append_value(r.4);
        lr.append_value(r.5);
    }
    Ok(RecordBatch::try_new(
        TRAIN_METRICS_SCHEMA.clone(),
        vec![
            Arc::new(e.finish()) as ArrayRef,
            Arc::new(s.finish()),
            Arc::new(sp.finish()),
            Arc::new(m.finish()),
            Arc::new(v.finish()),
            Arc::new(lr.finish()),
        ],
    )?)
}
