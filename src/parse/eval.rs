//! Scores the parser against reference SceneGraphParser output: the
//! hand-picked gold captions (exact match) and the dev set of real CC3M
//! captions (multiset F1 of relation triples and of entity heads).

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;

use super::attach::{self, AttachModel, Example};
use super::chunks::{self, ChunkModel};
use super::{Engine, Learned};
use crate::error::{Error, Result};

#[derive(Deserialize, Clone)]
struct RefRel {
    subject: String,
    relation: String,
    object: String,
}

#[derive(Deserialize)]
struct GoldItem {
    caption: String,
    #[serde(default)]
    entities: Vec<String>,
    relations: Vec<RefRel>,
    #[serde(default)]
    acceptable_alternative_relations: Option<Vec<RefRel>>,
}

#[derive(Deserialize, Clone)]
struct RefEntity {
    span: String,
    head: String,
}

#[derive(Deserialize, Clone)]
struct DevItem {
    caption: String,
    #[serde(default)]
    entities: Vec<String>,
    #[serde(default)]
    entity_details: Vec<RefEntity>,
    relations: Vec<RefRel>,
}

pub type Triple = (String, String, String);

fn triples(r: &[RefRel]) -> Vec<Triple> {
    let mut v: Vec<Triple> = r
        .iter()
        .map(|r| (r.subject.clone(), r.relation.clone(), r.object.clone()))
        .collect();
    v.sort();
    v
}

/// Entity heads and sorted (subject, relation, object) head triples of a caption.
pub fn predicted(caption: &str, strict: bool) -> (Vec<String>, Vec<Triple>) {
    predicted_with(caption, strict, Learned::shipped())
}

/// [`predicted`] with the given learned parts.
pub fn predicted_with(caption: &str, strict: bool, learned: Learned) -> (Vec<String>, Vec<Triple>) {
    heads_and_triples(&super::parse_caption_with(caption, strict, learned))
}

/// [`predicted`] for many captions with either engine.
pub fn predicted_all(
    captions: &[&str],
    strict: bool,
    engine: Engine,
    learned: Learned,
) -> Result<Vec<(Vec<String>, Vec<Triple>)>> {
    Ok(super::parse_captions(captions, engine, strict, learned)?
        .iter()
        .map(heads_and_triples)
        .collect())
}

/// Entity heads and sorted head triples of a graph.
pub fn heads_and_triples(g: &super::SceneGraph) -> (Vec<String>, Vec<Triple>) {
    let ents = g.entities.iter().map(|e| e.head.clone()).collect();
    let mut rels: Vec<Triple> = g
        .relations
        .iter()
        .map(|r| {
            (
                g.entities[r.subject].head.clone(),
                r.relation.clone(),
                g.entities[r.object].head.clone(),
            )
        })
        .collect();
    rels.sort();
    (ents, rels)
}

/// Multiset overlap.
fn overlap<T: std::hash::Hash + Eq + Clone>(a: &[T], b: &[T]) -> usize {
    let mut m: HashMap<&T, i64> = HashMap::new();
    for x in a {
        *m.entry(x).or_default() += 1;
    }
    let mut n = 0;
    for x in b {
        if let Some(c) = m.get_mut(x) {
            if *c > 0 {
                *c -= 1;
                n += 1;
            }
        }
    }
    n
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Prf {
    pub tp: usize,
    pub predicted: usize,
    pub reference: usize,
}

impl Prf {
    pub fn precision(&self) -> f64 {
        self.tp as f64 / self.predicted.max(1) as f64
    }
    pub fn recall(&self) -> f64 {
        self.tp as f64 / self.reference.max(1) as f64
    }
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
    fn add(&mut self, tp: usize, pred: usize, reference: usize) {
        self.tp += tp;
        self.predicted += pred;
        self.reference += reference;
    }
}

#[derive(Debug, Default)]
pub struct GoldScore {
    pub n: usize,
    pub exact: usize,
    pub exact_or_alternative: usize,
    pub entities_exact: usize,
    pub misses: Vec<String>,
}

pub fn score_gold(path: &Path, strict: bool, engine: Engine) -> Result<GoldScore> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let items: Vec<GoldItem> = serde_json::from_str(&text).map_err(|e| Error::CorruptRecord {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut s = GoldScore {
        n: items.len(),
        ..Default::default()
    };
    let caps: Vec<&str> = items.iter().map(|g| g.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict, engine, Learned::shipped())?;
    for (g, (ents, rels)) in items.iter().zip(pred) {
        let exp = triples(&g.relations);
        let exact = rels == exp;
        let alt = g
            .acceptable_alternative_relations
            .as_ref()
            .is_some_and(|a| triples(a) == rels);
        s.exact += exact as usize;
        s.exact_or_alternative += (exact || alt) as usize;
        s.entities_exact += (ents == g.entities) as usize;
        if !exact {
            s.misses
                .push(format!("{}\n    got {rels:?}\n    exp {exp:?}", g.caption));
        }
    }
    Ok(s)
}

#[derive(Debug, Default)]
pub struct DevScore {
    pub captions: usize,
    pub relations: Prf,
    pub entities: Prf,
    pub exact_captions: usize,
}

/// Captions of the dev set where the parse differs, with both sides.
pub fn dev_misses(
    path: &Path,
    strict: bool,
    engine: Engine,
    entities: bool,
    limit: usize,
) -> Result<Vec<String>> {
    let items = read_dev(path)?;
    if engine == Engine::Rules {
        return Ok(misses(&items, strict, Learned::shipped(), entities, limit));
    }
    let caps: Vec<&str> = items.iter().map(|d| d.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict, engine, Learned::none())?;
    let mut out = Vec::new();
    for (d, (ents, rels)) in items.iter().zip(pred) {
        // Only the captions that miss are analysed again, for their arcs.
        let line = || {
            let docs = super::spacy::analyse(&[d.caption.as_str()]).unwrap_or_default();
            let arcs: Vec<String> = docs
                .iter()
                .flat_map(|doc| &doc.tokens)
                .map(|t| format!("{}/{}/{}<{}", t.text, t.tag, t.dep, t.head))
                .collect();
            arcs.join(" ")
        };
        out.extend(miss_text(d, &ents, &rels, entities, line));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// Captions of `items` where the parse with `learned` differs, with both
/// sides and the tags the chunker sees.
fn misses(
    items: &[DevItem],
    strict: bool,
    learned: Learned,
    entities: bool,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    for d in items {
        if out.len() >= limit {
            break;
        }
        let (ents, rels) = predicted_with(&d.caption, strict, learned);
        let line = || {
            let mut toks = super::rule_tokens(&d.caption);
            if let Some(m) = learned.chunks {
                m.apply(&mut toks, strict);
            }
            let tags: Vec<String> = toks
                .iter()
                .map(|t| format!("{}/{}", t.word, t.tag))
                .collect();
            tags.join(" ")
        };
        out.extend(miss_text(d, &ents, &rels, entities, line));
    }
    out
}

/// The report of a caption whose entity heads (or relations) differ from
/// the reference: caption, `line()` (what the parser saw), both sides.
fn miss_text(
    d: &DevItem,
    ents: &[String],
    rels: &[Triple],
    entities: bool,
    line: impl FnOnce() -> String,
) -> Option<String> {
    let exp = triples(&d.relations);
    let (got, want) = if entities {
        if ents == d.entities.as_slice() {
            return None;
        }
        (format!("{ents:?}"), format!("{:?}", d.entities))
    } else {
        if rels == exp.as_slice() {
            return None;
        }
        (format!("{rels:?}"), format!("{exp:?}"))
    };
    Some(format!(
        "{}\n    {}\n    got {got}\n    exp {want}",
        d.caption,
        line()
    ))
}

fn read_dev(path: &Path) -> Result<Vec<DevItem>> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::CorruptRecord {
            path: path.into(),
            message: e.to_string(),
        })
}

pub fn score_dev(path: &Path, strict: bool, engine: Engine) -> Result<DevScore> {
    score_dev_with(path, strict, engine, Learned::shipped())
}

/// [`score_dev`] with the given learned parts (rules engine).
pub fn score_dev_with(
    path: &Path,
    strict: bool,
    engine: Engine,
    learned: Learned,
) -> Result<DevScore> {
    let items = read_dev(path)?;
    if engine == Engine::Rules {
        return Ok(score_items(&items, strict, learned));
    }
    let caps: Vec<&str> = items.iter().map(|d| d.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict, engine, learned)?;
    Ok(tally(&items, pred))
}

fn score_items(items: &[DevItem], strict: bool, learned: Learned) -> DevScore {
    let pred: Vec<(Vec<String>, Vec<Triple>)> = items
        .par_iter()
        .map(|d| predicted_with(&d.caption, strict, learned))
        .collect();
    tally(items, pred)
}

fn tally(items: &[DevItem], pred: Vec<(Vec<String>, Vec<Triple>)>) -> DevScore {
    let per: Vec<(usize, usize, usize, usize, usize, usize, bool)> = items
        .iter()
        .zip(pred)
        .map(|(d, (ents, rels))| {
            let exp = triples(&d.relations);
            (
                overlap(&exp, &rels),
                rels.len(),
                exp.len(),
                overlap(&d.entities, &ents),
                ents.len(),
                d.entities.len(),
                rels == exp,
            )
        })
        .collect();
    let mut s = DevScore {
        captions: items.len(),
        ..Default::default()
    };
    for (a, b, c, d, e, f, x) in per {
        s.relations.add(a, b, c);
        s.entities.add(d, e, f);
        s.exact_captions += x as usize;
    }
    s
}

/// The attachment decisions of a caption's rule parse, labelled with the
/// options whose relations agree best with the reference: each triple an
/// option makes counts +1 when the reference has it and -1 otherwise (no
/// relation: 0). Decisions where all options tie teach nothing and are left out.
fn last(s: &str) -> &str {
    s.rsplit(' ').next().unwrap_or("")
}

fn examples(d: &DevItem, strict: bool, learned: Learned) -> Vec<Example> {
    let mut trace = Vec::new();
    super::parse_traced(&d.caption, strict, learned, Some(&mut trace));
    let exp = triples(&d.relations);
    trace
        .into_iter()
        .filter_map(|dec| {
            let net: Vec<i32> = dec
                .subjects
                .iter()
                .map(|ss| {
                    let mut n = 0;
                    for s in ss {
                        for (rel, obj) in &dec.pairs {
                            // Heads compared by their last word: a compound
                            // the chunker got wrong is not an attachment error.
                            let hit = exp.iter().any(|(a, r, o)| {
                                last(a) == last(s) && r == rel && last(o) == last(obj)
                            });
                            n += if hit { 1 } else { -1 };
                        }
                    }
                    n
                })
                .collect();
            let best = *net.iter().max()?;
            if net.iter().all(|&n| n == best) {
                return None;
            }
            let gold = (0..net.len()).filter(|&i| net[i] == best).collect();
            Some(Example {
                decision: dec,
                gold,
            })
        })
        .collect()
}

/// Chunk-role training tokens of a caption; None when its reference
/// spans do not line up with the tokens.
fn chunk_examples(d: &DevItem) -> Option<Vec<chunks::Example>> {
    let t = super::rule_tokens(&d.caption);
    let spans: Vec<(String, String)> = d
        .entity_details
        .iter()
        .map(|e| (e.span.clone(), e.head.clone()))
        .collect();
    let roles = chunks::reference_roles(&t, &spans)?;
    Some(chunks::examples(&t, &roles))
}

/// Relation and entity scores of one configuration on held-out captions.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub relations: Prf,
    pub entities: Prf,
}

pub struct Fold {
    pub captions: usize,
    pub rules: Scores,
    /// Rules + learned chunk roles.
    pub chunks: Scores,
    /// Rules + learned chunk roles + learned attachment.
    pub both: Scores,
    /// Held-out captions the full configuration gets wrong (up to the
    /// requested number).
    pub misses: Vec<String>,
}

/// Training of the learned parts on a dev file, with a cross-validated
/// estimate: the captions are split in two halves by position (even/odd);
/// each half is scored with models trained on the other.
pub struct TrainOutcome {
    pub attach: AttachModel,
    pub chunks: ChunkModel,
    /// Labelled attachment decisions.
    pub examples: usize,
    /// Labelled chunk-role tokens, and captions left out because their
    /// reference spans do not line up with the tokens.
    pub chunk_examples: usize,
    pub chunk_unaligned: usize,
    /// Labelled decisions where the rules already choose a reference option.
    pub rule_right: usize,
    /// (rule option kind -> reference option kinds, count), most frequent first.
    pub breakdown: Vec<(String, usize)>,
    pub folds: Vec<Fold>,
}

/// Both models from `items`: chunk roles first, then attachment decisions
/// traced over the chunks the chunk model gives.
fn train_both(
    items: &[&DevItem],
    chunk_ex: &[Option<Vec<chunks::Example>>],
    strict: bool,
    epochs: usize,
    rule_bonus: (f32, f32),
) -> (ChunkModel, AttachModel, Vec<Example>) {
    let ce: Vec<&chunks::Example> = chunk_ex.iter().flatten().flatten().collect();
    let cm = chunks::train(&ce, epochs);
    let traced = |attach: Option<&AttachModel>| -> Vec<Example> {
        let learned = Learned {
            attach,
            chunks: Some(&cm),
        };
        let per: Vec<Vec<Example>> = items
            .par_iter()
            .map(|d| examples(d, strict, learned))
            .collect();
        per.into_iter().flatten().collect()
    };
    let all = traced(None);
    let refs: Vec<&Example> = all.iter().collect();
    let mut am = attach::train_refs(&refs, epochs);
    am.add_rule_bonus(rule_bonus.0, rule_bonus.1);
    // The model's own choices change what later decisions see: trace again
    // with it and retrain on both sets of decisions (one round of DAgger;
    // more rounds did not help held-out).
    let more = traced(Some(&am));
    let refs: Vec<&Example> = all.iter().chain(more.iter()).collect();
    am = attach::train_refs(&refs, epochs);
    am.add_rule_bonus(rule_bonus.0, rule_bonus.1);
    (cm, am, all)
}

/// What to print of the held-out misses: how many per fold, and whether
/// entity heads (else relations) are compared.
#[derive(Debug, Default, Clone, Copy)]
pub struct MissReport {
    pub per_fold: usize,
    pub entities: bool,
}

pub fn train_parser(
    path: &Path,
    strict: bool,
    epochs: usize,
    rule_bonus: (f32, f32),
    report: MissReport,
) -> Result<TrainOutcome> {
    let items = read_dev(path)?;
    let chunk_ex: Vec<Option<Vec<chunks::Example>>> =
        items.par_iter().map(chunk_examples).collect();
    let scores = |held: &[DevItem], learned: Learned| {
        let s = score_items(held, strict, learned);
        Scores {
            relations: s.relations,
            entities: s.entities,
        }
    };
    let mut folds = Vec::new();
    for f in 0..2 {
        let train_items: Vec<&DevItem> = items.iter().skip(1 - f).step_by(2).collect();
        let train_chunks: Vec<Option<Vec<chunks::Example>>> =
            chunk_ex.iter().skip(1 - f).step_by(2).cloned().collect();
        let (cm, am, _) = train_both(&train_items, &train_chunks, strict, epochs, rule_bonus);
        let held: Vec<DevItem> = items.iter().skip(f).step_by(2).cloned().collect();
        let full = Learned {
            attach: Some(&am),
            chunks: Some(&cm),
        };
        folds.push(Fold {
            misses: misses(&held, strict, full, report.entities, report.per_fold),
            captions: held.len(),
            rules: scores(&held, Learned::none()),
            chunks: scores(
                &held,
                Learned {
                    attach: None,
                    chunks: Some(&cm),
                },
            ),
            both: scores(&held, full),
        });
    }
    let all_items: Vec<&DevItem> = items.iter().collect();
    let (chunk_model, model, all) = train_both(&all_items, &chunk_ex, strict, epochs, rule_bonus);
    let rule_of = |e: &Example| {
        e.decision
            .options
            .iter()
            .position(|o| o.iter().any(|f| f == "rule" || f == "vrule"))
            .unwrap_or(0)
    };
    let rule_right = all.iter().filter(|e| e.gold.contains(&rule_of(e))).count();
    let mut table: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &all {
        let kind = |i: usize| e.decision.options[i][0].clone();
        let g: Vec<String> = e.gold.iter().map(|&i| kind(i)).collect();
        *table
            .entry(format!(
                "rules {} -> reference {}",
                kind(rule_of(e)),
                g.join("/")
            ))
            .or_default() += 1;
    }
    let mut breakdown: Vec<(String, usize)> = table.into_iter().collect();
    breakdown.sort_by_key(|x| std::cmp::Reverse(x.1));
    Ok(TrainOutcome {
        attach: model,
        chunks: chunk_model,
        examples: all.len(),
        chunk_examples: chunk_ex.iter().flatten().map(Vec::len).sum(),
        chunk_unaligned: chunk_ex.iter().filter(|c| c.is_none()).count(),
        rule_right,
        breakdown,
        folds,
    })
}

/// How the `spacy` engine compares with spaCy + SceneGraphParser on the
/// captions of a parity file (scripts/make_spacy_parity_fixture.py).
#[derive(Debug, Default)]
pub struct Parity {
    pub captions: usize,
    /// Captions whose token texts differ.
    pub tokens_differ: usize,
    /// Captions with the same tokens but another norm, tag, POS, arc or lemma.
    pub analysis_differs: usize,
    /// Captions whose scene graph (entities or relations) differs.
    pub graphs_differ: usize,
    pub examples: Vec<String>,
}

pub fn spacy_parity(path: &Path, max_examples: usize) -> Result<Parity> {
    let corrupt = |message: String| Error::CorruptRecord {
        path: path.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| corrupt(e.to_string())))
        .collect::<Result<_>>()?;
    let caps: Vec<&str> = rows
        .iter()
        .map(|r| {
            r["caption"]
                .as_str()
                .ok_or_else(|| corrupt("a line has no caption".into()))
        })
        .collect::<Result<_>>()?;
    let mut p = Parity {
        captions: caps.len(),
        ..Default::default()
    };
    for (chunk_rows, chunk_caps) in rows.chunks(4096).zip(caps.chunks(4096)) {
        let docs = super::spacy::analyse(chunk_caps)?;
        let graphs = super::spacy::scene_graphs(&docs, true)?;
        for ((r, d), g) in chunk_rows.iter().zip(&docs).zip(&graphs) {
            let texts: Vec<&str> = d.tokens.iter().map(|t| t.text.as_str()).collect();
            let want_texts: Vec<&str> = r["tokens"]
                .as_array()
                .map(|a| a.iter().map(|t| t[0].as_str().unwrap_or("")).collect())
                .unwrap_or_default();
            let toks = serde_json::Value::Array(
                d.tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!([t.text, t.norm, t.tag, t.pos, t.dep, t.head, t.lemma])
                    })
                    .collect(),
            );
            let ents = serde_json::Value::Array(
                g.entities
                    .iter()
                    .map(|e| serde_json::json!([e.span, e.head, e.lemma_head, e.modifiers, e.kind]))
                    .collect(),
            );
            let rels = serde_json::Value::Array(
                g.relations
                    .iter()
                    .map(|x| serde_json::json!([x.subject, x.relation, x.object]))
                    .collect(),
            );
            let mut bad = false;
            if texts != want_texts {
                p.tokens_differ += 1;
                bad = true;
            } else if toks != r["tokens"] {
                p.analysis_differs += 1;
                bad = true;
            }
            if ents != r["entities"] || rels != r["relations"] {
                p.graphs_differ += 1;
                bad = true;
            }
            if bad && p.examples.len() < max_examples {
                p.examples.push(format!(
                    "{}\n  spaCy {} {} {}\n  ours  {toks} {ents} {rels}",
                    r["caption"], r["tokens"], r["entities"], r["relations"]
                ));
            }
        }
    }
    Ok(p)
}
