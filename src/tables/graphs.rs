//! `entities` and `relations`: scene graphs, written by `parse` and
//! `import-parses`, read by `mine`.
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

pub(crate) static ENTITIES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Int64, false),
        Field::new("entity_idx", DataType::Int32, false),
        Field::new("span", DataType::Utf8, false),
        Field::new("head", DataType::Utf8, false),
        Field::new("lemma_head", DataType::Utf8, false),
        Field::new(
            "modifiers",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new("kind", DataType::Utf8, true),
    ]))
});

pub(crate) static RELATIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Int64, false),
        Field::new("relation_idx", DataType::Int32, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("relation", DataType::Utf8, false),
        Field::new("object", DataType::Utf8, false),
        Field::new("subject_idx", DataType::Int32, true),
        Field::new("object_idx", DataType::Int32, true),
    ]))
});

/// Row builders for the `entities` and `relations` tables, shared by the
/// stages that write scene graphs.
#[derive(Default)]
pub(crate) struct GraphRows {
    e_img: Int64Builder,
    e_idx: Int32Builder,
    e_span: StringBuilder,
    e_head: StringBuilder,
    e_lemma: StringBuilder,
    e_mods: ListBuilder<StringBuilder>,
    e_kind: StringBuilder,
    r_img: Int64Builder,
    r_idx: Int32Builder,
    r_s: StringBuilder,
    r_r: StringBuilder,
    r_o: StringBuilder,
    r_si: Int32Builder,
    r_oi: Int32Builder,
}

impl GraphRows {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn entity(
        &mut self,
        image_id: i64,
        idx: usize,
        span: &str,
        head: &str,
        lemma: &str,
        mods: &[String],
        kind: Option<&str>,
    ) {
        self.e_img.append_value(image_id);
        self.e_idx.append_value(idx as i32);
        self.e_span.append_value(span);
        self.e_head.append_value(head);
        self.e_lemma.append_value(lemma);
        for m in mods {
            self.e_mods.values().append_value(m);
        }
        self.e_mods.append(true);
        self.e_kind.append_option(kind);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn relation(
        &mut self,
        image_id: i64,
        idx: usize,
        s: &str,
        r: &str,
        o: &str,
        si: Option<usize>,
        oi: Option<usize>,
    ) {
        self.r_img.append_value(image_id);
        self.r_idx.append_value(idx as i32);
        self.r_s.append_value(s);
        self.r_r.append_value(r);
        self.r_o.append_value(o);
        self.r_si.append_option(si.map(|v| v as i32));
        self.r_oi.append_option(oi.map(|v| v as i32));
    }

    /// (entities, relations) batches.
    pub(crate) fn finish(mut self) -> Result<(RecordBatch, RecordBatch)> {
        let e = RecordBatch::try_new(
            ENTITIES_SCHEMA.clone(),
            vec![
                Arc::new(self.e_img.finish()) as ArrayRef,
                Arc::new(self.e_idx.finish()),
                Arc::new(self.e_span.finish()),
                Arc::new(self.e_head.finish()),
                Arc::new(self.e_lemma.finish()),
                Arc::new(self.e_mods.finish()),
                Arc::new(self.e_kind.finish()),
            ],
        )?;
        let r = RecordBatch::try_new(
            RELATIONS_SCHEMA.clone(),
            vec![
                Arc::new(self.r_img.finish()) as ArrayRef,
                Arc::new(self.r_idx.finish()),
                Arc::new(self.r_s.finish()),
                Arc::new(self.r_r.finish()),
                Arc::new(self.r_o.finish()),
                Arc::new(self.r_si.finish()),
                Arc::new(self.r_oi.finish()),
            ],
        )?;
        Ok((e, r))
    }
}
