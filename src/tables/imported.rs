//! What `import-scores` writes and `score` reads: the similarities or the
//! query and gallery embeddings of methods scored outside genecis-rs.
//!
//! - `imported_scores(task, template_id, method, similarities list<f32>)`:
//!   a GeneCIS template's candidates in its order (target first).
//! - `imported_queries(task, template_id, method, embedding list<f32>)`.
//! - `imported_gallery(method, image_key, embedding list<f32>)`.
//!
//! Lists, not fixed-size ones: each method has its own width.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, AsArray, Float32Builder, ListBuilder, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::eval::{Given, GivenMethods, Method};
use crate::tables::embeddings::Embeddings;

fn list_f32() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

pub(crate) static SCORES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("template_id", DataType::UInt32, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("similarities", list_f32(), false),
    ]))
});

pub(crate) static QUERIES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("template_id", DataType::UInt32, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("embedding", list_f32(), false),
    ]))
});

pub(crate) static GALLERY_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("method", DataType::Utf8, false),
        Field::new("image_key", DataType::Utf8, false),
        Field::new("embedding", list_f32(), false),
    ]))
});

/// One imported row: (task, template id) or an image key, the method,
/// the values.
pub(crate) struct Row {
    pub task: String,
    pub template_id: u32,
    pub method: String,
    pub values: Vec<f32>,
}

fn values_array(rows: &[&[f32]]) -> ArrayRef {
    let mut b = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Float32,
        true,
    )));
    for r in rows {
        b.values().append_slice(r);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// `imported_scores` (`queries = false`) or `imported_queries` rows.
pub(crate) fn template_batch(rows: &[Row], queries: bool) -> Result<RecordBatch> {
    let schema = if queries {
        QUERIES_SCHEMA.clone()
    } else {
        SCORES_SCHEMA.clone()
    };
    let vals: Vec<&[f32]> = rows.iter().map(|r| r.values.as_slice()).collect();
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.task.as_str()),
            )),
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.template_id),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.method.as_str()),
            )),
            values_array(&vals),
        ],
    )?)
}

/// `imported_gallery` rows: (method, image key, embedding).
pub(crate) fn gallery_batch(rows: &[(String, String, Vec<f32>)]) -> Result<RecordBatch> {
    let vals: Vec<&[f32]> = rows.iter().map(|r| r.2.as_slice()).collect();
    Ok(RecordBatch::try_new(
        GALLERY_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.as_str()),
            )),
            values_array(&vals),
        ],
    )?)
}

fn list_row(col: &ArrayRef, i: usize) -> Vec<f32> {
    let v = col.as_list::<i32>().value(i);
    v.as_primitive::<Float32Type>().values().to_vec()
}

/// Every imported method of an `import-scores` stage's tables (each
/// optional): similarities, or query embeddings with their gallery.
pub(crate) fn read_given(
    scores: Option<&Path>,
    queries: Option<&Path>,
    gallery: Option<&Path>,
) -> Result<GivenMethods> {
    let mut out = GivenMethods::new();
    let read = |dir: Option<&Path>| -> Result<Vec<RecordBatch>> {
        match dir {
            Some(d) => crate::framework::store::read_table(d),
            None => Ok(Vec::new()),
        }
    };
    let col = crate::framework::store::column;
    for (batches, is_queries) in [(read(scores)?, false), (read(queries)?, true)] {
        for b in &batches {
            let task = col(b, "task")?.as_string::<i32>().clone();
            let id = col(b, "template_id")?.as_primitive::<UInt32Type>().clone();
            let method = col(b, "method")?.as_string::<i32>().clone();
            let vals = col(
                b,
                if is_queries {
                    "embedding"
                } else {
                    "similarities"
                },
            )?
            .clone();
            for i in 0..b.num_rows() {
                let name = Method::imported(method.value(i)).name();
                let entry = out.entry(name).or_insert_with(|| {
                    if is_queries {
                        Given::Embeddings {
                            queries: HashMap::new(),
                            gallery: Embeddings::new(&[], Vec::new(), 0),
                        }
                    } else {
                        Given::Similarities(HashMap::new())
                    }
                });
                let key = (task.value(i).to_string(), id.value(i));
                match entry {
                    Given::Similarities(m) | Given::Queries(m) => m.insert(key, list_row(&vals, i)),
                    Given::Embeddings { queries, .. } => queries.insert(key, list_row(&vals, i)),
                };
            }
        }
    }
    // Each method's gallery: keys in file order, one width.
    let mut galleries: HashMap<&'static str, (Vec<String>, Vec<f32>, usize)> = HashMap::new();
    for b in &read(gallery)? {
        let method = col(b, "method")?.as_string::<i32>().clone();
        let key = col(b, "image_key")?.as_string::<i32>().clone();
        let vals = col(b, "embedding")?.clone();
        for i in 0..b.num_rows() {
            let name = Method::imported(method.value(i)).name();
            let g = galleries.entry(name).or_default();
            let v = list_row(&vals, i);
            if g.2 != 0 && v.len() != g.2 {
                return Err(Error::Data(format!(
                    "imported_gallery: method {name} has embeddings of widths {} and {}; rerun its import-scores stage",
                    g.2,
                    v.len()
                )));
            }
            g.2 = v.len();
            g.0.push(key.value(i).to_string());
            g.1.extend(v);
        }
    }
    for (name, (keys, values, dim)) in galleries {
        match out.get_mut(name) {
            Some(Given::Embeddings { gallery, .. }) => *gallery = Embeddings::new(&keys, values, dim),
            _ => {
                return Err(Error::Data(format!(
                    "imported_gallery has embeddings of method {name}, which has no imported queries; rerun its import-scores stage"
                )))
            }
        }
    }
    Ok(out)
}
