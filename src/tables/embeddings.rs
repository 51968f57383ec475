//! `image_embeddings(image_key, model, embedding)` and
//! `text_embeddings(text, model, embedding)`: written by `embed`, read by
//! score and train, and gathered into rows by key.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use tch::{Device, Kind, Tensor};

/// `fixed_size_list<f32>` of `dim`, the model's embedding width.
pub(crate) fn embedding_type(dim: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), dim)
}

/// `image_embeddings` with embeddings of width `dim`.
pub(crate) fn image_embeddings_schema(dim: i32) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("image_key", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("embedding", embedding_type(dim), false),
    ]))
}

/// `text_embeddings` with embeddings of width `dim`.
pub(crate) fn text_embeddings_schema(dim: i32) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("embedding", embedding_type(dim), false),
    ]))
}

/// Embeddings of one model: key -> row of a row-major matrix.
#[derive(Clone)]
pub(crate) struct Embeddings {
    pub index: HashMap<String, usize>,
    pub values: Vec<f32>,
    pub dim: usize,
}

impl Embeddings {
    pub(crate) fn new(keys: &[String], values: Vec<f32>, dim: usize) -> Embeddings {
        Embeddings {
            index: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i))
                .collect(),
            values,
            dim,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&[f32]> {
        self.index.get(key).map(|&i| self.row(i))
    }

    pub(crate) fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Reads `(key_column, model, embedding)` rows of `model` (or of the only
/// model present).
pub(crate) fn read_embeddings(
    dir: &Path,
    key_col: &str,
    model: Option<&str>,
) -> Result<(String, Embeddings), String> {
    let batches = crate::framework::store::read_table(dir).map_err(|e| e.to_string())?;
    let mut models = std::collections::BTreeSet::new();
    for b in &batches {
        let m = b.column_by_name("model").ok_or("no model column")?;
        models.extend(m.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    let chosen = match model {
        // An empty table (no conditions to encode) holds no model at all.
        Some(m) if models.contains(m) || models.is_empty() => m.to_string(),
        Some(m) => {
            return Err(format!(
                "no embeddings of model '{m}' in {}; it holds: {}",
                dir.display(),
                models.into_iter().collect::<Vec<_>>().join(", ")
            ))
        }
        None if models.len() <= 1 => models.into_iter().next().unwrap_or_default(),
        None => {
            return Err(format!(
                "{} holds embeddings of several models ({}): set params.model",
                dir.display(),
                models.into_iter().collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let mut index = HashMap::new();
    let mut values = Vec::new();
    let mut dim = 0usize;
    for b in &batches {
        let keys = b
            .column_by_name(key_col)
            .ok_or("no key column")?
            .as_string::<i32>()
            .clone();
        let m = b
            .column_by_name("model")
            .ok_or("no model column")?
            .as_string::<i32>()
            .clone();
        let emb = b
            .column_by_name("embedding")
            .ok_or("no embedding column")?
            .as_fixed_size_list()
            .clone();
        let d = emb.value_length() as usize;
        if dim != 0 && d != dim && emb.len() > 0 {
            return Err(format!("embedding widths differ ({dim} and {d})"));
        }
        if emb.len() > 0 {
            dim = d;
        }
        let vals = emb.values().as_primitive::<Float32Type>();
        for i in 0..b.num_rows() {
            if m.value(i) != chosen {
                continue;
            }
            let row = index.len();
            if index.insert(keys.value(i).to_string(), row).is_some() {
                return Err(format!("'{}' has two embeddings", keys.value(i)));
            }
            let v = &vals.values()[i * d..(i + 1) * d];
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!(
                    "the embedding of '{}' (model {chosen}) holds NaN or infinite values: the model that wrote it is broken (rerun the embed stage with finite weights); no score is made from it",
                    keys.value(i)
                ));
            }
            values.extend_from_slice(v);
        }
    }
    Ok((chosen, Embeddings { index, values, dim }))
}

/// One batch of `image_embeddings` (`image = true`) or `text_embeddings`:
/// `keys[i]` has row i of the row-major `values`.
pub(crate) fn embeddings_batch(
    image: bool,
    keys: arrow::array::ArrayRef,
    model: &str,
    values: Vec<f32>,
    dim: i32,
) -> crate::error::Result<arrow::array::RecordBatch> {
    let n = keys.len();
    let schema = if image {
        image_embeddings_schema(dim)
    } else {
        text_embeddings_schema(dim)
    };
    let list = arrow::array::FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        dim,
        Arc::new(arrow::array::Float32Array::from(values)),
        None,
    )?;
    Ok(arrow::array::RecordBatch::try_new(
        schema,
        vec![
            keys,
            Arc::new(arrow::array::StringArray::from(vec![model; n])),
            Arc::new(list),
        ],
    )?)
}

/// A model's output as rows, refused when any value is NaN or infinite
/// (its weights are checked finite on load, so an overflow).
pub(crate) fn finite_rows(feats: &Tensor, what: &str) -> crate::error::Result<Vec<f32>> {
    let rows = tensor_rows(feats)?;
    if rows.iter().any(|x| !x.is_finite()) {
        return Err(crate::error::Error::Data(format!(
            "the model gives NaN or infinite {what} embeddings (its weights are finite, so an overflow: with mixed precision, try fp32)"
        )));
    }
    Ok(rows)
}

pub(crate) fn tensor_rows(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    Vec::<f32>::try_from(t.view([-1]))
}
