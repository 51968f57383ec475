//! `parse`: captions -> scene graphs with SceneGraphParser 0.1.0's output
//! shape and quirks, in pure Rust: SceneGraphParser's rules over a port of
//! spaCy's en_core_web_sm 3.8.0 (`spacy/`), identical to the reference on
//! every CC3M validation caption.
//!
//! Tables:
//! - `entities(image_id Int64, entity_idx Int32, span Utf8, head Utf8, lemma_head Utf8, modifiers List<Utf8>, kind Utf8?)`
//! - `relations(image_id Int64, relation_idx Int32, subject Utf8, relation Utf8, object Utf8, subject_idx Int32?, object_idx Int32?)`
//!
//! One output part per input part of `captions`, so resume and `--shard`
//! follow the ingest chunks.

pub mod eval;
pub mod spacy;

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::tables::captions::captions_of;
use crate::tables::graphs::{GraphRows, ENTITIES_SCHEMA, RELATIONS_SCHEMA};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ParseParams {
    /// true: SceneGraphParser 0.1.0 exactly, quirks included (GeneCIS parity);
    /// false: the later upstream fixes on the same parse.
    pub strict_v010: bool,
    /// Accepted only as "spacy", the one engine; kept so that a manifest
    /// naming the removed "rules" engine gets a clear error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

impl Default for ParseParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        ParseParams {
            strict_v010: true,
            engine: None,
        }
    }
}

/// One parsed entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub span: String,
    pub head: String,
    pub lemma_head: String,
    pub modifiers: Vec<String>,
    pub kind: &'static str,
}

/// One relation between entities (indices into the entity list).
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub subject: usize,
    pub relation: String,
    pub object: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SceneGraph {
    pub entities: Vec<Entity>,
    pub relations: Vec<Relation>,
}

/// Parses captions (rayon over batches). Never panics, whatever the input.
pub fn parse_captions(captions: &[&str], strict_v010: bool) -> Result<Vec<SceneGraph>> {
    let per: Vec<Result<Vec<SceneGraph>>> = captions
        .par_chunks(spacy::BATCH)
        .map(|c| spacy::parse_batch_with(c, strict_v010))
        .collect();
    let mut out = Vec::with_capacity(captions.len());
    for p in per {
        out.extend(p?);
    }
    Ok(out)
}

pub(crate) struct Parse;

impl Stage for Parse {
    const KIND: &'static str = "parse";
    const VERSION: &'static str = "3";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "captions -> scene graphs (SceneGraphParser 0.1.0 on en_core_web_sm 3.8.0): entities, relations";
    type Params = ParseParams;
    /// The captions part files, one per chunk.
    type Work = Vec<PathBuf>;

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[InputTable::required("captions")];
        INPUTS
    }

    fn code() -> &'static [&'static str] {
        static MODEL_DIGEST: LazyLock<[String; 1]> =
            LazyLock::new(|| [blake3::hash(spacy::model_bytes()).to_hex().to_string()]);
        static CODE: LazyLock<[&'static str; 1]> = LazyLock::new(|| [MODEL_DIGEST[0].as_str()]);
        &*CODE
    }

    fn validate(p: &ParseParams, _base: &Path) -> Vec<Finding> {
        match p.engine.as_deref() {
            None | Some("spacy") => Vec::new(),
            Some("rules") => vec![Finding::error(
                "engine",
                "the \"rules\" engine was removed: the parser is now the exact port of spaCy + SceneGraphParser (as fast on 2 cores as the Python original on 50). Delete the engine line",
            )],
            Some(other) => vec![Finding::error(
                "engine",
                format!("unknown engine '{other}'; there is one engine, \"spacy\" (the default): delete the line"),
            )],
        }
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("entities", ENTITIES_SCHEMA.clone()),
            TableDef::new("relations", RELATIONS_SCHEMA.clone()),
        ]
    }

    fn plan(_p: &ParseParams, ctx: &StageContext) -> Result<Chunks<Vec<PathBuf>>> {
        let parts = crate::framework::store::part_files(ctx.input("captions")?)?;
        let sizes = parts
            .iter()
            .map(|p| crate::framework::store::part_rows(p))
            .collect::<Result<_>>()?;
        Ok(Chunks {
            work: parts,
            sizes,
            unit: "captions",
            parallel: None,
            width: None,
        })
    }

    fn run_shared(
        p: &ParseParams,
        parts: &Vec<PathBuf>,
        k: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let (ids, caps) = read_captions(&parts[k])?;
        let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
        let graphs = parse_captions(&refs, p.strict_v010)?;
        let (e, r) = to_batches(&ids, &graphs)?;
        Ok(Some(vec![("entities", e), ("relations", r)]))
    }
}

fn read_captions(path: &Path) -> Result<(Vec<i64>, Vec<String>)> {
    let rows = captions_of(&crate::framework::store::read_part(path)?)?;
    Ok(rows.into_iter().map(|c| (c.image_id, c.caption)).unzip())
}

/// A parsed graph for one image.
fn push_graph(rows: &mut GraphRows, image_id: i64, g: &SceneGraph) {
    for (j, e) in g.entities.iter().enumerate() {
        rows.entity(
            image_id,
            j,
            &e.span,
            &e.head,
            &e.lemma_head,
            &e.modifiers,
            Some(e.kind),
        );
    }
    for (j, r) in g.relations.iter().enumerate() {
        let (s, o) = (&g.entities[r.subject].head, &g.entities[r.object].head);
        rows.relation(
            image_id,
            j,
            s,
            &r.relation,
            o,
            Some(r.subject),
            Some(r.object),
        );
    }
}

/// Entity and relation batches for captions `ids` with their graphs.
pub(crate) fn to_batches(ids: &[i64], graphs: &[SceneGraph]) -> Result<(RecordBatch, RecordBatch)> {
    let mut rows = GraphRows::default();
    for (&id, g) in ids.iter().zip(graphs) {
        push_graph(&mut rows, id, g);
    }
    rows.finish()
}
