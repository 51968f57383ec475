//! Scores the parser against reference SceneGraphParser output: the
//! hand-picked gold captions (exact match) and the dev set of real CC3M
//! captions (multiset F1 of relation triples and of entity heads).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

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
struct DevItem {
    caption: String,
    #[serde(default)]
    entities: Vec<String>,
    relations: Vec<RefRel>,
}

pub(crate) type Triple = (String, String, String);

fn triples(r: &[RefRel]) -> Vec<Triple> {
    let mut v: Vec<Triple> = r
        .iter()
        .map(|r| (r.subject.clone(), r.relation.clone(), r.object.clone()))
        .collect();
    v.sort();
    v
}

/// Entity heads and sorted head triples of each caption's parse.
pub(crate) fn predicted_all(
    captions: &[&str],
    strict: bool,
) -> Result<Vec<(Vec<String>, Vec<Triple>)>> {
    Ok(super::parse_captions(captions, strict)?
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
    pub(crate) fn precision(&self) -> f64 {
        self.tp as f64 / self.predicted.max(1) as f64
    }
    pub(crate) fn recall(&self) -> f64 {
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

/// A reference file (gold, dev, parity) that does not parse.
fn bad_file(what: &'static str, path: &Path, message: String) -> Error {
    Error::BadInputFile {
        what,
        path: path.into(),
        message,
        advice: "Pass the file the README names (sg_gold.dev.json: a JSON list; reference_parses.dev.jsonl: one object per line), or rewrite a parity file with scripts/make_spacy_parity_fixture.py",
    }
}

pub fn score_gold(path: &Path, strict: bool) -> Result<GoldScore> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let items: Vec<GoldItem> =
        serde_json::from_str(&text).map_err(|e| bad_file("gold file", path, e.to_string()))?;
    let mut s = GoldScore {
        n: items.len(),
        ..Default::default()
    };
    let caps: Vec<&str> = items.iter().map(|g| g.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict)?;
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
pub(crate) fn dev_misses(
    path: &Path,
    strict: bool,
    entities: bool,
    limit: usize,
) -> Result<Vec<String>> {
    let items = read_dev(path)?;
    let caps: Vec<&str> = items.iter().map(|d| d.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict)?;
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
        .map_err(|e| bad_file("dev file", path, e.to_string()))
}

pub fn score_dev(path: &Path, strict: bool) -> Result<DevScore> {
    let items = read_dev(path)?;
    let caps: Vec<&str> = items.iter().map(|d| d.caption.as_str()).collect();
    let pred = predicted_all(&caps, strict)?;
    Ok(tally(&items, pred))
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
    let corrupt = |message: String| bad_file("parity file", path, message);
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
