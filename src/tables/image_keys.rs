//! `image_keys(image_key, source, path, bbox_*?, required, rgb_first)` and
//! `texts(text)`: the images and conditions a benchmark needs encoded,
//! written by `templates`, read by embed, score and train.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};

use crate::error::Result;

pub(crate) static IMAGE_KEYS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_key", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("bbox_x", DataType::Float64, true),
        Field::new("bbox_y", DataType::Float64, true),
        Field::new("bbox_w", DataType::Float64, true),
        Field::new("bbox_h", DataType::Float64, true),
        Field::new("required", DataType::Boolean, false),
        Field::new("rgb_first", DataType::Boolean, false),
    ]))
});

pub(crate) static TEXTS_SCHEMA: LazyLock<SchemaRef> =
    LazyLock::new(|| Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)])));

/// One row of `image_keys`.
#[derive(Debug, Clone)]
pub(crate) struct KeyRow {
    pub key: String,
    pub path: PathBuf,
    pub bbox: Option<[f64; 4]>,
    pub required: bool,
    pub rgb_first: bool,
}

/// Distinct keys of an `image_keys` table, sorted.
pub(crate) fn read_image_keys(dir: &Path) -> Result<Vec<KeyRow>> {
    let mut out: BTreeMap<String, KeyRow> = BTreeMap::new();
    for b in crate::framework::store::read_table(dir)? {
        let col = |n: &str| crate::framework::store::column(&b, n).cloned();
        let key = col("image_key")?;
        let key = key.as_string::<i32>();
        let path = col("path")?;
        let path = path.as_string::<i32>();
        let bb: Vec<ArrayRef> = ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]
            .iter()
            .map(|n| col(n))
            .collect::<Result<_>>()?;
        let bb: Vec<_> = bb.iter().map(|a| a.as_primitive::<Float64Type>()).collect();
        let req = col("required")?;
        let req = req.as_boolean();
        let rgb_first = b
            .column_by_name("rgb_first")
            .map(|c| c.as_boolean().clone());
        for i in 0..b.num_rows() {
            let bbox = if bb.iter().all(|a| a.is_valid(i)) {
                Some([
                    bb[0].value(i),
                    bb[1].value(i),
                    bb[2].value(i),
                    bb[3].value(i),
                ])
            } else {
                None
            };
            let row = KeyRow {
                key: key.value(i).to_string(),
                path: PathBuf::from(path.value(i)),
                bbox,
                required: req.value(i),
                rgb_first: rgb_first.as_ref().is_some_and(|c| c.value(i)),
            };
            out.entry(row.key.clone())
                .and_modify(|r| r.required |= row.required)
                .or_insert(row);
        }
    }
    Ok(out.into_values().collect())
}

/// Distinct values of a text column, sorted.
pub(crate) fn read_texts(dir: &Path, column: &str) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for b in crate::framework::store::read_table(dir)? {
        if let Some(c) = b.column_by_name(column) {
            let c = arrow::compute::cast(c, &DataType::Utf8)?;
            out.extend(c.as_string::<i32>().iter().flatten().map(str::to_string));
        }
    }
    Ok(out.into_iter().collect())
}

/// One image a benchmark needs, as `templates` writes it.
pub(crate) struct ImageKey {
    /// The file's origin (`coco`, `vg`, `cirr`, `mit_states`).
    pub source: &'static str,
    pub path: PathBuf,
    /// The VAW crop box, for attribute templates.
    pub bbox: Option<[f64; 4]>,
    /// The original converts this image to RGB before its transform.
    pub rgb_first: bool,
}

/// The `image_keys` rows of `keys`, in key order; every one required.
pub(crate) fn image_keys_batch(keys: &BTreeMap<String, ImageKey>) -> Result<RecordBatch> {
    let mut k_key = StringBuilder::new();
    let mut k_src = StringBuilder::new();
    let mut k_path = StringBuilder::new();
    let mut bb: [Float64Builder; 4] = Default::default();
    let mut k_req = BooleanBuilder::new();
    let mut k_rgb = BooleanBuilder::new();
    for (key, k) in keys {
        k_key.append_value(key);
        k_src.append_value(k.source);
        k_path.append_value(k.path.to_string_lossy());
        match k.bbox {
            Some(bbox) => {
                for (b, v) in bb.iter_mut().zip(bbox) {
                    b.append_value(v);
                }
            }
            None => bb.iter_mut().for_each(|b| b.append_null()),
        }
        k_req.append_value(true);
        k_rgb.append_value(k.rgb_first);
    }
    let [mut bx, mut by, mut bw, mut bh] = bb;
    Ok(RecordBatch::try_new(
        IMAGE_KEYS_SCHEMA.clone(),
        vec![
            Arc::new(k_key.finish()) as ArrayRef,
            Arc::new(k_src.finish()),
            Arc::new(k_path.finish()),
            Arc::new(bx.finish()),
            Arc::new(by.finish()),
            Arc::new(bw.finish()),
            Arc::new(bh.finish()),
            Arc::new(k_req.finish()),
            Arc::new(k_rgb.finish()),
        ],
    )?)
}

/// The `texts` rows, in the set's order.
pub(crate) fn texts_batch(texts: &std::collections::BTreeSet<String>) -> Result<RecordBatch> {
    let mut tx = StringBuilder::new();
    for t in texts {
        tx.append_value(t);
    }
    Ok(RecordBatch::try_new(
        TEXTS_SCHEMA.clone(),
        vec![Arc::new(tx.finish())],
    )?)
}
