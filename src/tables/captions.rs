//! `captions(image_id, caption, image_path?, url?)`: written by `ingest`,
//! read by parse, pretrain, embed and train.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

use crate::error::Result;
use crate::framework::stage::resolve_path;
use crate::framework::store::{column, read_table};

pub(crate) static CAPTIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("image_path", DataType::Utf8, true),
        Field::new("url", DataType::Utf8, true),
    ]))
});

/// One `captions` row, as the stages that read captions use it.
pub(crate) struct Caption {
    pub image_id: i64,
    pub caption: String,
    /// The image file, as written (relative to the manifest's folder).
    pub image_path: Option<String>,
}

/// The rows of `captions` batches, in order; `image_path` may be absent.
pub(crate) fn captions_of(batches: &[RecordBatch]) -> Result<Vec<Caption>> {
    let mut out = Vec::new();
    for b in batches {
        let id = cast(column(b, "image_id")?, &DataType::Int64)?;
        let cap = cast(column(b, "caption")?, &DataType::Utf8)?;
        let (id, cap) = (id.as_primitive::<Int64Type>(), cap.as_string::<i32>());
        let path = b.column_by_name("image_path");
        let path = path.map(|p| p.as_string::<i32>());
        for i in 0..b.num_rows() {
            out.push(Caption {
                image_id: id.value(i),
                caption: if cap.is_valid(i) { cap.value(i) } else { "" }.to_string(),
                image_path: path
                    .filter(|p| p.is_valid(i))
                    .map(|p| p.value(i).to_string()),
            });
        }
    }
    Ok(out)
}

/// The `captions` table in a stage's input folder.
pub(crate) fn read_captions(dir: &Path) -> Result<Vec<Caption>> {
    captions_of(&read_table(dir)?)
}

/// `image_id -> image_path` of the `captions` table, resolved against `base`.
pub(crate) fn read_image_paths(dir: &Path, base: &Path) -> Result<HashMap<i64, PathBuf>> {
    Ok(read_captions(dir)?
        .into_iter()
        .filter_map(|c| {
            let p = c.image_path?;
            Some((c.image_id, resolve_path(base, Path::new(&p))))
        })
        .collect())
}

/// Image ids without a file path, as a message naming a few.
pub(crate) fn missing_paths(images: &[i64], paths: &HashMap<i64, PathBuf>) -> Option<String> {
    let missing: Vec<i64> = images
        .iter()
        .filter(|i| !paths.contains_key(i))
        .copied()
        .collect();
    (!missing.is_empty()).then(|| {
        let few: Vec<String> = missing.iter().take(5).map(|i| i.to_string()).collect();
        format!(
            "{} image id(s) of the triplets have no image_path in the captions table, e.g. {}; ingest with an image folder so captions carry paths",
            missing.len(),
            few.join(", ")
        )
    })
}
