//! `captions(image_id, caption, image_path?, url?)`: written by `ingest`,
//! read by parse, pretrain, embed and train.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

use crate::error::Result;

pub(crate) static CAPTIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("image_path", DataType::Utf8, true),
        Field::new("url", DataType::Utf8, true),
    ]))
});

/// `image_id -> image_path` of the `captions` table.
pub(crate) fn read_image_paths(dir: &Path, base: &Path) -> Result<HashMap<i64, PathBuf>> {
    let mut out = HashMap::new();
    for b in crate::framework::store::read_table(dir)? {
        let id = crate::framework::store::column(&b, "image_id")?.clone();
        let id = id.as_primitive::<Int64Type>();
        let Some(p) = b.column_by_name("image_path") else {
            continue;
        };
        let p = p.as_string::<i32>();
        for i in 0..b.num_rows() {
            if p.is_valid(i) {
                out.insert(
                    id.value(i),
                    crate::framework::stage::resolve_path(base, Path::new(p.value(i))),
                );
            }
        }
    }
    Ok(out)
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
