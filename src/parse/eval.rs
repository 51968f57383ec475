//! Scores the parser against reference SceneGraphParser output: the
//! hand-picked gold captions (exact match) and the dev set of real CC3M
//! captions (multiset F1 of relation triples and of entity heads).

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
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

#[derive(Deserialize)]
struct DevItem {
    caption: String,
    #[serde(default)]
    entities: Vec<String>,
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
    let g = super::parse_caption(caption, strict);
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

pub fn score_gold(path: &Path, strict: bool) -> Result<GoldScore> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let items: Vec<GoldItem> = serde_json::from_str(&text).map_err(|e| Error::CorruptRecord {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut s = GoldScore {
        n: items.len(),
        ..Default::default()
    };
    for g in &items {
        let (ents, rels) = predicted(&g.caption, strict);
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
pub fn dev_misses(path: &Path, strict: bool, entities: bool, limit: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let d: DevItem = serde_json::from_str(l).map_err(|e| Error::CorruptRecord {
            path: path.into(),
            message: e.to_string(),
        })?;
        let (ents, rels) = predicted(&d.caption, strict);
        let exp = triples(&d.relations);
        let bad = if entities {
            ents != d.entities
        } else {
            rels != exp
        };
        if bad {
            let tags: Vec<String> = super::tag(&d.caption)
                .iter()
                .map(|t| format!("{}/{}", t.word, t.tag))
                .collect();
            out.push(if entities {
                format!(
                    "{}\n    {}\n    got {ents:?}\n    exp {:?}",
                    d.caption,
                    tags.join(" "),
                    d.entities
                )
            } else {
                format!(
                    "{}\n    {}\n    got {rels:?}\n    exp {exp:?}",
                    d.caption,
                    tags.join(" ")
                )
            });
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

pub fn score_dev(path: &Path, strict: bool) -> Result<DevScore> {
    let text = std::fs::read_to_string(path).map_err(Error::io("cannot read", path))?;
    let items: Vec<DevItem> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::CorruptRecord {
            path: path.into(),
            message: e.to_string(),
        })?;
    let per: Vec<(usize, usize, usize, usize, usize, usize, bool)> = items
        .par_iter()
        .map(|d| {
            let (ents, rels) = predicted(&d.caption, strict);
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
    Ok(s)
}
