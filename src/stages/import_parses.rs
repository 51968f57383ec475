//! `import-parses`: scene graphs produced elsewhere (the reference Python
//! SceneGraphParser's JSONL: `{"row", "caption", "entities", "entity_details",
//! "relations"}`) into the same `entities` / `relations` tables the `parse`
//! stage writes, so mining and evaluation can run on them.
//!
//! Tables: `entities` and `relations` as in [`crate::parse`], and
//! `rejects(source, line_number, reason, raw)`.
//!
//! `repeat = k` writes k copies with fresh image ids (`row + copy * (max_row + 1)`),
//! to build CC3M-sized tables from a small parse file for benchmarks. One part
//! per copy.

use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::tables::graphs::{GraphRows, ENTITIES_SCHEMA, RELATIONS_SCHEMA};
use crate::tables::rejects::{RejectRows, REJECTS_SCHEMA};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportParams {
    pub path: PathBuf,
    #[serde(default = "one")]
    pub repeat: usize,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct RefEntity {
    span: String,
    head: String,
    lemma_head: String,
    #[serde(default)]
    modifiers: Vec<String>,
}

#[derive(Deserialize)]
struct RefRelation {
    subject: String,
    relation: String,
    object: String,
}

#[derive(Deserialize)]
struct RefParse {
    row: i64,
    #[serde(default)]
    entity_details: Vec<RefEntity>,
    #[serde(default)]
    relations: Vec<RefRelation>,
}

pub(crate) struct ImportParses;

impl Stage for ImportParses {
    const KIND: &'static str = "import-parses";
    const VERSION: &'static str = "1";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "reference scene-graph parses (JSONL) -> entities, relations, rejects";
    type Params = ImportParams;

    type Work = Parsed;

    fn input_tables() -> &'static [InputTable] {
        &[]
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("entities", ENTITIES_SCHEMA.clone()),
            TableDef::new("relations", RELATIONS_SCHEMA.clone()),
            TableDef::new("rejects", REJECTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &ImportParams, _base: &Path) -> Vec<Finding> {
        if p.repeat == 0 || p.repeat > 10_000 {
            return vec![Finding::error("repeat", "use 1 to 10,000")];
        }
        Vec::new()
    }

    fn files(p: &ImportParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![("path", crate::framework::stage::resolve_path(base, &p.path))]
    }

    fn plan(p: &ImportParams, ctx: &StageContext) -> Result<Chunks<Parsed>> {
        let path = ctx.resolve(&p.path);
        let text = std::fs::read(&path).map_err(Error::io("cannot read", &path))?;
        let mut lines: Vec<Vec<u8>> = text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        // A trailing newline leaves one empty last line: not a record.
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let parsed: Vec<std::result::Result<RefParse, String>> = lines
            .par_iter()
            .map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                serde_json::from_slice::<RefParse>(l)
                    .map_err(|e| format!("not a parse object: {e}"))
            })
            .collect();
        let stride = parsed
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.row)
            .max()
            .unwrap_or(0)
            + 1;
        let bad = parsed.iter().filter(|r| r.is_err()).count();
        if bad > 0 {
            ctx.note(format!("{bad} line(s) rejected: see table rejects"));
        }
        let n = parsed.len() as u64;
        Ok(Chunks {
            work: Parsed {
                source: path.display().to_string(),
                lines,
                parsed,
                stride,
            },
            sizes: vec![n; p.repeat],
            unit: "parses",
            parallel: None,
            width: None,
        }
        .in_parallel())
    }

    fn run_shared(
        _p: &ImportParams,
        w: &Parsed,
        copy: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let offset = copy as i64 * w.stride;
        let (ents, rels, rej) = build(&w.parsed, &w.lines, offset, copy == 0, &w.source)?;
        Ok(Some(vec![
            ("entities", ents),
            ("relations", rels),
            ("rejects", rej),
        ]))
    }
}

/// The parse file, line by line; each copy is one chunk.
pub(crate) struct Parsed {
    source: String,
    lines: Vec<Vec<u8>>,
    parsed: Vec<std::result::Result<RefParse, String>>,
    /// Image-id offset between copies.
    stride: i64,
}

type Batches = (RecordBatch, RecordBatch, RecordBatch);

fn build(
    parsed: &[std::result::Result<RefParse, String>],
    lines: &[Vec<u8>],
    offset: i64,
    with_rejects: bool,
    source: &str,
) -> Result<Batches> {
    let mut rows = GraphRows::default();
    let mut rejects = RejectRows::default();
    for (i, p) in parsed.iter().enumerate() {
        let p = match p {
            Ok(p) => p,
            Err(reason) => {
                if with_rejects {
                    rejects.push(
                        source,
                        Some(i as i64 + 1),
                        reason,
                        &String::from_utf8_lossy(&lines[i][..lines[i].len().min(512)]),
                    );
                }
                continue;
            }
        };
        let img = p.row + offset;
        for (j, e) in p.entity_details.iter().enumerate() {
            rows.entity(img, j, &e.span, &e.head, &e.lemma_head, &e.modifiers, None);
        }
        // The reference names relation ends by head; the index is the first entity with that head.
        let idx_of = |h: &str| p.entity_details.iter().position(|e| e.head == h);
        for (j, r) in p.relations.iter().enumerate() {
            rows.relation(
                img,
                j,
                &r.subject,
                &r.relation,
                &r.object,
                idx_of(&r.subject),
                idx_of(&r.object),
            );
        }
    }
    let (ents, rels) = rows.finish()?;
    Ok((ents, rels, rejects.finish()?))
}
