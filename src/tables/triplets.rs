//! `triplets`: mined (reference, target, distractor, condition) samples,
//! written by `mine`, read by embed and train.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, LazyLock};

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt64Type};

use crate::error::{Error, Result};

pub(crate) static TRIPLETS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("ref_image_id", DataType::Int64, false),
        Field::new("ref_relation_idx", DataType::Int32, false),
        Field::new("target_image_id", DataType::Int64, false),
        Field::new("target_relation_idx", DataType::Int32, false),
        Field::new("distractor_image_id", DataType::Int64, false),
        Field::new("distractor_relation_idx", DataType::Int32, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("relation", DataType::Utf8, false),
        Field::new("object", DataType::Utf8, false),
        Field::new("condition", DataType::Utf8, false),
        Field::new("concreteness", DataType::Float64, true),
        Field::new("attempts", DataType::UInt32, false),
    ]))
});

/// One training sample: rows into [`Triplets::images`] and `texts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub reference: u32,
    pub target: u32,
    pub distractor: u32,
    pub text: u32,
}

/// The `triplets` table in `sample_id` order, over distinct images and
/// conditions.
pub(crate) struct Triplets {
    /// Distinct image ids, sorted.
    pub images: Vec<i64>,
    /// Distinct conditions (`relation + " " + object`), sorted.
    pub texts: Vec<String>,
    pub samples: Vec<Sample>,
}

pub(crate) fn read_triplets(dir: &Path) -> Result<Triplets> {
    let mut rows: Vec<(u64, i64, i64, i64, String)> = Vec::new();
    for b in crate::framework::store::read_table(dir)? {
        let col = |n: &str| crate::framework::store::column(&b, n).cloned();
        let id = col("sample_id")?;
        let id = id.as_primitive::<UInt64Type>();
        let ids: Vec<_> = ["ref_image_id", "target_image_id", "distractor_image_id"]
            .iter()
            .map(|n| col(n))
            .collect::<Result<_>>()?;
        let ids: Vec<_> = ids.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let cond = col("condition")?;
        let cond = cond.as_string::<i32>();
        for i in 0..b.num_rows() {
            rows.push((
                id.value(i),
                ids[0].value(i),
                ids[1].value(i),
                ids[2].value(i),
                cond.value(i).to_string(),
            ));
        }
    }
    if rows.is_empty() {
        return Err(Error::Data(
            "the triplets table is empty: nothing to train on. Check the mine stage's notes (too few subjects, or a concreteness threshold no sample passes)".into(),
        ));
    }
    rows.sort_by_key(|r| r.0);
    if let Some(w) = rows.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Data(format!(
            "sample_id {} appears twice in the triplets table; give train one mine stage's triplets",
            w[0].0
        )));
    }
    let images: Vec<i64> = rows
        .iter()
        .flat_map(|r| [r.1, r.2, r.3])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let texts: Vec<String> = rows
        .iter()
        .map(|r| r.4.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let img_row: HashMap<i64, u32> = images
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    let txt_row: HashMap<&str, u32> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let samples = rows
        .iter()
        .map(|r| Sample {
            reference: img_row[&r.1],
            target: img_row[&r.2],
            distractor: img_row[&r.3],
            text: txt_row[r.4.as_str()],
        })
        .collect();
    Ok(Triplets {
        images,
        texts,
        samples,
    })
}
