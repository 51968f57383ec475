//! `parse`: captions -> scene graphs with SceneGraphParser 0.1.0's output
//! shape and quirks, in pure Rust (Brill tagger + caption rules; no model).
//!
//! Tables:
//! - `entities(image_id Int64, entity_idx Int32, span Utf8, head Utf8, lemma_head Utf8, modifiers List<Utf8>, kind Utf8?)`
//! - `relations(image_id Int64, relation_idx Int32, subject Utf8, relation Utf8, object Utf8, subject_idx Int32?, object_idx Int32?)`
//!
//! One output part per input part of `captions`, so resume and `--shard`
//! follow the ingest chunks.

pub mod attach;
pub mod chunks;
pub mod eval;
pub mod grammar;
pub mod spacy;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use arrow::array::{ArrayRef, AsArray, Int32Builder, Int64Builder, ListBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::stage::{Stage, StageContext, StageReport, TableDef};
use grammar::Tok;

pub static ENTITIES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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

pub static RELATIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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

static SCENE_NOUNS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("lexicon/scene_nouns.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// The Brill tagger with caption-domain corrections of its lexicon.
static TAGGER: LazyLock<english_pos_tagger::Tagger> = LazyLock::new(|| {
    let mut t = english_pos_tagger::Tagger::new();
    t.update_lexicon(
        include_str!("lexicon/tag_overrides.tsv")
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('\t'))
            .map(|(w, tags)| {
                (
                    w.trim().to_string(),
                    tags.split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                )
            }),
    );
    t
});

/// Which parser makes the scene graphs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// SceneGraphParser 0.1.0 over a port of spaCy's en_core_web_sm 3.8.0:
    /// the reference output itself.
    #[default]
    Spacy,
    /// Tagger, hand-written rules and small learned models: several times
    /// faster, and further from the reference.
    Rules,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Engine, String> {
        match s {
            "spacy" => Ok(Engine::Spacy),
            "rules" => Ok(Engine::Rules),
            other => Err(format!(
                "unknown engine '{other}': use \"spacy\" or \"rules\""
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParseParams {
    /// "spacy" (default): the reference pipeline, ported; "rules": faster.
    #[serde(default)]
    pub engine: Engine,
    /// true: SceneGraphParser 0.1.0 exactly, quirks included (GeneCIS parity).
    #[serde(default = "yes")]
    pub strict_v010: bool,
    /// Let the learned model (lexicon/attach_weights.tsv.gz) choose where a PP
    /// after a noun hangs; false: the hand-written rules alone.
    #[serde(default = "yes")]
    pub learned_attachment: bool,
    /// Let the learned chunk-role model (lexicon/chunk_weights.tsv.gz) correct
    /// tags that put a word in or out of a noun chunk; false: rules alone.
    #[serde(default = "yes")]
    pub learned_chunks: bool,
}

/// The learned parts of the parser; None parts fall back to the rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct Learned<'a> {
    pub attach: Option<&'a attach::AttachModel>,
    pub chunks: Option<&'a chunks::ChunkModel>,
}

impl Learned<'static> {
    /// The models that ship in `lexicon/`.
    pub fn shipped() -> Learned<'static> {
        Learned {
            attach: attach::DEFAULT.as_ref(),
            chunks: chunks::DEFAULT.as_ref(),
        }
    }

    /// The hand-written rules alone.
    pub fn none() -> Learned<'static> {
        Learned::default()
    }

    fn from_params(p: &ParseParams) -> Learned<'static> {
        let s = Learned::shipped();
        Learned {
            attach: s.attach.filter(|_| p.learned_attachment),
            chunks: s.chunks.filter(|_| p.learned_chunks),
        }
    }
}

fn yes() -> bool {
    true
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

fn intern_tag(tag: &str) -> &'static str {
    const TAGS: &[&str] = &[
        "CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR", "JJS", "LS", "MD", "NN", "NNS", "NNP",
        "NNPS", "PDT", "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM", "TO", "UH", "VB",
        "VBD", "VBG", "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB", ".", ",", ":", "(", ")",
        "``", "''", "#", "$",
    ];
    TAGS.iter().copied().find(|t| *t == tag).unwrap_or("XX")
}

fn is_symbol(w: &str) -> bool {
    !w.is_empty()
        && w.chars().all(|c| !c.is_alphanumeric())
        && !matches!(w, "." | "," | ":" | ";" | "!" | "?" | "'s" | "'")
}

/// CC3M captions are already tokenised with spaces ("a dog , on the bed .");
/// split on whitespace, then peel off edge punctuation and a possessive
/// "'s". Alphanumerics such as "3d" or "1950s" stay whole.
pub fn tokenize(s: &str) -> Vec<&str> {
    const EDGE: &[char] = &[',', '.', ':', ';', '!', '?', '(', ')', '"', '[', ']'];
    let mut out = Vec::new();
    for piece in s.split_whitespace() {
        let mut p = piece;
        let mut tail = Vec::new();
        while p.len() > 1 && p.ends_with(EDGE) {
            let c = p.len() - p.chars().next_back().unwrap().len_utf8();
            tail.push(&p[c..]);
            p = &p[..c];
        }
        while p.len() > 1 && p.starts_with(EDGE) {
            let c = p.chars().next().unwrap().len_utf8();
            out.push(&p[..c]);
            p = &p[c..];
        }
        if p.len() > 2 && p.ends_with("'s") {
            out.push(&p[..p.len() - 2]);
            out.push("'s");
        } else if !p.is_empty() {
            out.push(p);
        }
        out.extend(tail.into_iter().rev());
    }
    out
}

/// Tags a caption with the Brill tagger. spaCy's lemma quirks that change
/// relations are mirrored ("riding" -> "rid", so "riding on" stays "on").
pub fn tag(caption: &str) -> Vec<Tok> {
    let lower = caption.to_lowercase();
    let raw = tokenize(&lower);
    let mut toks: Vec<Tok> = TAGGER
        .tag_raw_tokens(&raw)
        .into_iter()
        .map(|t| {
            let word = t.value.to_lowercase();
            let tag = if is_symbol(&word) {
                "SYM"
            } else {
                intern_tag(t.pos.as_deref().unwrap_or(""))
            };
            let lemma = match word.as_str() {
                "riding" => "rid".to_string(),
                _ => t.lemma.unwrap_or_else(|| word.clone()),
            };
            Tok {
                word,
                tag,
                lemma,
                role: None,
            }
        })
        .collect();
    while toks.last().is_some_and(|t| t.word == ".") {
        toks.pop();
    }
    retag_verbs_after_people(&mut toks);
    // Hyphenated words ("t - shirt", "sold - out", "close - up"): the parts
    // of a noun become a compound, other parts adjectives.
    let mut i = 0;
    while i + 2 < toks.len() {
        let alnum = |w: &str| w.chars().all(|c| c.is_alphanumeric());
        if toks[i + 1].word == "-" && alnum(&toks[i].word) && alnum(&toks[i + 2].word) {
            toks.remove(i + 1);
            if toks[i].word == "close" && toks[i + 1].word == "up" {
                toks[i].tag = "NN";
                toks[i + 1].tag = "NN";
            } else if matches!(toks[i + 1].tag, "NN" | "NNS") {
                toks[i].tag = "NN";
            } else {
                toks[i].tag = "JJ";
                toks[i + 1].tag = "JJ";
            }
        }
        i += 1;
    }
    toks
}

/// Nouns naming people: CC3M's anonymised "person" and the like. A
/// verb right after one of them is often tagged as the second noun of a
/// compound ("person sang", "man drinks").
const PEOPLE: &[&str] = &[
    "person",
    "people",
    "man",
    "men",
    "woman",
    "women",
    "boy",
    "girl",
    "child",
    "children",
    "actor",
    "actress",
    "artist",
    "player",
    "team",
    "couple",
    "family",
    "bride",
    "groom",
    "singer",
    "model",
    "politician",
    "athlete",
];

/// The tag the tagger gives `word` as the verb of a pronoun subject, when
/// that is a verb tag.
fn verb_reading(word: &str) -> Option<&'static str> {
    let subject = if word.ends_with('s') { "he" } else { "they" };
    let probe = TAGGER.tag_raw_tokens(&[subject, word]);
    let tag = intern_tag(probe.get(1)?.pos.as_deref()?);
    matches!(tag, "VBZ" | "VBD" | "VBP").then_some(tag)
}

fn retag_verbs_after_people(toks: &mut [Tok]) {
    // Infinitives: "to see the", "to catch mice" (the tagger often says NN).
    for i in 1..toks.len() {
        if toks[i - 1].word == "to"
            && matches!(toks[i].tag, "NN" | "VBP")
            && toks.get(i + 1).is_some_and(|n| {
                matches!(n.tag, "DT" | "PRP$" | "NN" | "NNS" | "PRP" | "JJ" | "CD")
            })
            && !toks[i].word.ends_with('s')
            && verb_reading(&toks[i].word).is_some()
        {
            toks[i].tag = "VB";
            toks[i - 1].tag = "TO";
        }
    }
    // "he hikes", "they sang": a verb right after a subject pronoun.
    for i in 1..toks.len() {
        if matches!(
            toks[i - 1].word.as_str(),
            "he" | "she" | "it" | "they" | "we" | "i" | "you"
        ) && matches!(toks[i].tag, "NN" | "NNS")
        {
            if let Some(v) = verb_reading(&toks[i].word) {
                toks[i].tag = v;
            }
        }
    }
    // "as he comes": a subordinator before a subject pronoun.
    for i in 0..toks.len().saturating_sub(1) {
        if matches!(
            toks[i].word.as_str(),
            "as" | "when" | "where" | "after" | "before" | "until"
        ) && matches!(
            toks[i + 1].word.as_str(),
            "he" | "she" | "they" | "we" | "i" | "you" | "it"
        ) {
            toks[i].tag = "SUB";
        }
    }
    // A caption that opens with an imperative ("love the idea of ...").
    if toks.len() > 1
        && toks[0].tag == "NN"
        && matches!(toks[1].tag, "DT" | "PRP$")
        && verb_reading(&toks[0].word).is_some()
    {
        toks[0].tag = "VB";
    }
    for i in 1..toks.len() {
        let next_ok = toks.get(i + 1).is_none_or(|n| {
            matches!(
                n.tag,
                "DT" | "IN" | "PRP$" | "TO" | "RB" | "CD" | "," | "." | "PRP" | "JJ"
            )
        });
        if matches!(toks[i].tag, "NN" | "NNS")
            && matches!(toks[i - 1].tag, "NN" | "NNS")
            && PEOPLE.contains(&toks[i - 1].word.as_str())
            && next_ok
        {
            if let Some(v) = verb_reading(&toks[i].word) {
                toks[i].tag = v;
            }
        }
    }
}

/// Parses captions with the given engine (`learned` is the rules engine's).
/// Never panics, whatever the input.
pub fn parse_captions(
    captions: &[&str],
    engine: Engine,
    strict_v010: bool,
    learned: Learned,
) -> Result<Vec<SceneGraph>> {
    match engine {
        Engine::Spacy => {
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
        Engine::Rules => Ok(captions
            .par_iter()
            .map(|c| parse_caption_with(c, strict_v010, learned))
            .collect()),
    }
}

/// Parses one caption with the rules engine and the shipped models.
pub fn parse_caption(caption: &str, strict_v010: bool) -> SceneGraph {
    parse_caption_with(caption, strict_v010, Learned::shipped())
}

/// Parses one caption with the given learned parts.
pub fn parse_caption_with(caption: &str, strict_v010: bool, learned: Learned) -> SceneGraph {
    parse_traced(caption, strict_v010, learned, None)
}

/// The tokens as the chunker sees them before any learned correction:
/// tagged, with the caption fix-ups applied.
pub fn rule_tokens(caption: &str) -> Vec<Tok> {
    let mut t = tag(caption);
    grammar::fix_tags(&mut t);
    t
}

/// [`parse_caption_with`], recording attachment decisions into `trace`.
pub fn parse_traced(
    caption: &str,
    strict_v010: bool,
    learned: Learned,
    trace: Option<&mut Vec<attach::Decision>>,
) -> SceneGraph {
    if caption.trim().is_empty() {
        return SceneGraph::default();
    }
    let (t, g) = grammar::parse(
        tag(caption),
        strict_v010,
        learned.attach,
        learned.chunks,
        trace,
    );
    let mut pos = vec![usize::MAX; g.nps.len()];
    let mut entities = Vec::with_capacity(g.entities.len());
    for &k in &g.entities {
        let np = &g.nps[k];
        pos[k] = entities.len();
        let head = np.head(&t);
        let lemma_head = np
            .head_toks
            .iter()
            .map(|&i| t[i].lemma.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let last = lemma_head.rsplit(' ').next().unwrap_or("");
        let kind = if SCENE_NOUNS.contains(lemma_head.as_str()) || SCENE_NOUNS.contains(last) {
            "scene"
        } else {
            "unknown"
        };
        entities.push(Entity {
            span: (np.start..np.end)
                .map(|i| t[i].word.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            head,
            lemma_head,
            modifiers: np.mods.iter().map(|&i| t[i].word.clone()).collect(),
            kind,
        });
    }
    let relations = g
        .relations
        .into_iter()
        .filter(|(s, _, o)| pos[*s] != usize::MAX && pos[*o] != usize::MAX)
        .map(|(s, r, o)| Relation {
            subject: pos[s],
            relation: r,
            object: pos[o],
        })
        .collect();
    SceneGraph {
        entities,
        relations,
    }
}

pub struct Parse;

impl Stage for Parse {
    const KIND: &'static str = "parse";
    const VERSION: &'static str = "3";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "captions -> scene graphs (SceneGraphParser 0.1.0 semantics): entities, relations";
    type Params = ParseParams;

    fn input_tables() -> &'static [&'static str] {
        &["captions"]
    }

    fn code() -> &'static [&'static str] {
        static MODEL_DIGEST: LazyLock<String> =
            LazyLock::new(|| blake3::hash(spacy::model_bytes()).to_hex().to_string());
        static CODE: LazyLock<[&'static str; 6]> = LazyLock::new(|| {
            [
                MODEL_DIGEST.as_str(),
                include_str!("lexicon/phrasal_verbs.txt"),
                include_str!("lexicon/scene_nouns.txt"),
                include_str!("lexicon/tag_overrides.tsv"),
                attach::WEIGHTS_TSV.as_str(),
                chunks::WEIGHTS_TSV.as_str(),
            ]
        });
        &*CODE
    }

    fn validate(p: &ParseParams, _base: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if p.engine == Engine::Spacy && (!p.learned_attachment || !p.learned_chunks) {
            out.push((
                "engine".into(),
                "learned_attachment and learned_chunks belong to the rules engine; set engine = \"rules\" to switch them off".into(),
            ));
        }
        out
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef {
                name: "entities",
                schema: ENTITIES_SCHEMA.clone(),
            },
            TableDef {
                name: "relations",
                schema: RELATIONS_SCHEMA.clone(),
            },
        ]
    }

    fn run(p: &ParseParams, ctx: &StageContext) -> Result<StageReport> {
        let started = Instant::now();
        let dir = &ctx.inputs["captions"];
        let parts = crate::store::part_files(dir)?;
        let n_chunks = parts.len();
        let todo: Vec<usize> = (0..n_chunks)
            .filter(|&k| ctx.shard.is_none_or(|s| s.owns(k)) && !ctx.writer.chunk_done(k))
            .collect();
        let resumed = n_chunks - (0..n_chunks).filter(|&k| !ctx.writer.chunk_done(k)).count();
        let bar = ctx.progress.bar(ctx.stage, n_chunks as u64, "parts");
        bar.set_position(resumed as u64);
        let mut rows = 0u64;
        for k in todo {
            let (ids, caps) = read_captions(&parts[k])?;
            let learned = Learned::from_params(p);
            let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
            let graphs = parse_captions(&refs, p.engine, p.strict_v010, learned)?;
            rows += caps.len() as u64;
            let (e, r) = to_batches(&ids, &graphs)?;
            ctx.writer
                .write_chunk(k, &[("entities", e), ("relations", r)])?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(StageReport {
            rows_in: rows,
            chunks: n_chunks,
            chunks_resumed: resumed,
            notes: Vec::new(),
            elapsed: started.elapsed(),
        })
    }
}

fn read_captions(path: &Path) -> Result<(Vec<i64>, Vec<String>)> {
    let perr = |source| Error::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(Error::io("cannot open", path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(perr)?
        .build()
        .map_err(perr)?;
    let (mut ids, mut caps) = (Vec::new(), Vec::new());
    for b in reader {
        let b = b?;
        let id = arrow::compute::cast(
            b.column_by_name("image_id").expect("captions schema"),
            &DataType::Int64,
        )?;
        let cap = arrow::compute::cast(
            b.column_by_name("caption").expect("captions schema"),
            &DataType::Utf8,
        )?;
        ids.extend(id.as_primitive::<Int64Type>().values().iter().copied());
        caps.extend(
            cap.as_string::<i32>()
                .iter()
                .map(|s| s.unwrap_or("").to_string()),
        );
    }
    Ok((ids, caps))
}

/// Row builders for the `entities` and `relations` tables, shared by the
/// stages that write scene graphs.
#[derive(Default)]
pub struct GraphRows {
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
    pub fn entity(
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
    pub fn relation(
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

    /// A parsed graph for one image.
    pub fn graph(&mut self, image_id: i64, g: &SceneGraph) {
        for (j, e) in g.entities.iter().enumerate() {
            self.entity(
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
            self.relation(
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

    /// (entities, relations) batches.
    pub fn finish(mut self) -> Result<(RecordBatch, RecordBatch)> {
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

/// Entity and relation batches for captions `ids` with their graphs.
pub fn to_batches(ids: &[i64], graphs: &[SceneGraph]) -> Result<(RecordBatch, RecordBatch)> {
    let mut rows = GraphRows::default();
    for (&id, g) in ids.iter().zip(graphs) {
        rows.graph(id, g);
    }
    rows.finish()
}
