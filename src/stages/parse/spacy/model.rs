//! The embedded en_core_web_sm weights and tables, as written by
//! scripts/convert_spacy_sm.py into .spacy/ at set-up.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::LazyLock;

use serde_json::Value;

use crate::error::{Error, Result};

/// Written by scripts/setup.sh (scripts/convert_spacy_sm.py); build.rs
/// stops with instructions when it is missing.
static BYTES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.spacy/en_core_web_sm.bin.gz"
));

static MODEL: LazyLock<std::result::Result<Model, String>> = LazyLock::new(|| Model::load(BYTES));

/// The model, unpacked on first use.
pub(crate) fn model() -> Result<&'static Model> {
    MODEL.as_ref().map_err(|e| Error::ParserModel(e.clone()))
}

/// The bytes of the embedded model file (for stage fingerprints).
pub(crate) fn bytes() -> &'static [u8] {
    BYTES
}

/// Maxout (nO=96 outputs, nP pieces) followed by layer norm.
pub(crate) struct MaxoutLn {
    /// (nP * nO) x nI, row-major, piece-major (thinc stores nO x nP rows;
    /// grouping by piece makes the max an elementwise one over whole rows).
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub g: Vec<f32>,
    pub ln_b: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
    pub pieces: usize,
}

pub(crate) struct Action {
    pub mv: Move,
    pub label: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Move {
    Shift = 0,
    Reduce = 1,
    Left = 2,
    Right = 3,
    Break = 4,
}

/// One token spec of an attribute-ruler pattern.
#[derive(Default)]
pub(crate) struct TokSpec {
    pub lower: Option<Cond>,
    pub tag: Option<Cond>,
    pub dep: Option<Cond>,
    pub is_space: Option<bool>,
}

pub(crate) enum Cond {
    Eq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Regex(regex::Regex),
}

impl Cond {
    pub(crate) fn test(&self, v: &str) -> bool {
        match self {
            Cond::Eq(s) => s == v,
            Cond::In(l) => l.iter().any(|x| x == v),
            Cond::NotIn(l) => !l.iter().any(|x| x == v),
            Cond::Regex(r) => r.is_match(v),
        }
    }
}

pub(crate) struct RulerEntry {
    pub patterns: Vec<Vec<TokSpec>>,
    pub index: i64,
    pub pos: Option<String>,
    pub morph: Option<String>,
    pub lemma: Option<String>,
    pub tag: Option<String>,
    pub dep: Option<String>,
}

pub(crate) struct Lemma {
    pub rules: HashMap<String, Vec<(String, String)>>,
    pub exc: HashMap<String, HashMap<String, Vec<String>>>,
    pub index: HashMap<String, HashSet<String>>,
}

pub(crate) struct Model {
    pub seeds: Vec<u32>,
    pub mix: MaxoutLn,
    /// Embedding rows through the mixing layer ([`super::nn::mix_tables`]).
    pub mix_tables: Vec<Vec<f32>>,
    /// The first encoder layer's output for an all-zero window.
    pub enc0_const: Vec<f32>,
    pub enc: Vec<MaxoutLn>,
    pub tagger_w: Vec<f32>,
    pub tagger_b: Vec<f32>,
    pub proj_w: Vec<f32>,
    pub proj_b: Vec<f32>,
    /// (nF * nH * nP) x nH: the precomputable lower layer.
    pub lower_w: Vec<f32>,
    pub lower_b: Vec<f32>,
    pub lower_pad: Vec<f32>,
    /// `upper_w` transposed (hidden x actions), for a row-at-a-time product.
    pub upper_wt: Vec<f32>,
    pub upper_b: Vec<f32>,
    pub tags: Vec<String>,
    pub actions: Vec<Action>,
    pub ruler: Vec<RulerEntry>,
    /// Ruler entries that can match a pattern starting at a token with
    /// this tag, in ruler order; `ruler_any` for other tags.
    pub ruler_by_tag: HashMap<String, Vec<usize>>,
    pub ruler_any: Vec<usize>,
    pub lemma: Lemma,
    /// Keyed by the string hash of the exact token text.
    pub lexeme_norm: HashMap<u64, String>,
    /// Strings with a fixed id in spaCy's symbol table instead of a hash.
    pub symbols: HashMap<String, u64>,
    /// spaCy's BASE_NORMS, consulted after `lexeme_norm`.
    pub base_norms: HashMap<String, String>,
    /// Tokenizer special cases: text -> (token text, NORM override).
    pub special: HashMap<String, Vec<(String, Option<String>)>>,
    pub phrasal_verbs: HashSet<String>,
    pub phrasal_preps: HashSet<String>,
    pub scene_nouns: HashSet<String>,
}

pub(crate) const WIDTH: usize = 96;
pub(crate) const HIDDEN: usize = 64;
pub(crate) const N_FEATS: usize = 8;
pub(crate) const PIECES: usize = 2;

fn s(v: &Value) -> std::result::Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("expected a string, found {v}"))
}

fn strings(v: &Value) -> std::result::Result<Vec<String>, String> {
    v.as_array()
        .ok_or_else(|| format!("expected a list, found {v}"))?
        .iter()
        .map(s)
        .collect()
}

fn cond(v: &Value) -> std::result::Result<Cond, String> {
    Ok(match v {
        Value::String(x) => Cond::Eq(x.clone()),
        Value::Object(m) => {
            if let Some(l) = m.get("IN") {
                Cond::In(strings(l)?)
            } else if let Some(l) = m.get("NOT_IN") {
                Cond::NotIn(strings(l)?)
            } else if let Some(r) = m.get("REGEX") {
                Cond::Regex(regex::Regex::new(&s(r)?).map_err(|e| e.to_string())?)
            } else {
                return Err(format!("unsupported attribute-ruler condition {v}"));
            }
        }
        _ => return Err(format!("unsupported attribute-ruler condition {v}")),
    })
}

fn tok_spec(v: &Value) -> std::result::Result<TokSpec, String> {
    let m = v.as_object().ok_or("pattern token is not an object")?;
    let mut t = TokSpec::default();
    for (k, x) in m {
        match k.as_str() {
            "LOWER" => t.lower = Some(cond(x)?),
            "TAG" => t.tag = Some(cond(x)?),
            "DEP" => t.dep = Some(cond(x)?),
            "IS_SPACE" => t.is_space = x.as_bool(),
            other => return Err(format!("unsupported attribute-ruler key {other}")),
        }
    }
    Ok(t)
}

impl Model {
    fn load(gz: &[u8]) -> std::result::Result<Model, String> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .map_err(|e| format!("not gzip: {e}"))?;
        if raw.len() < 8 || &raw[..4] != b"GSM1" {
            return Err("bad magic (expected GSM1)".into());
        }
        let hlen = u32::from_le_bytes(raw[4..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(raw.get(8..8 + hlen).ok_or("short header")?)
            .map_err(|e| format!("header: {e}"))?;
        let data = &raw[8 + hlen..];
        let mut arrays: HashMap<String, Vec<f32>> = HashMap::new();
        for a in header["arrays"].as_array().ok_or("no arrays")? {
            let name = s(&a["name"])?;
            let n: usize = a["shape"]
                .as_array()
                .ok_or("no shape")?
                .iter()
                .map(|d| d.as_u64().unwrap_or(0) as usize)
                .product();
            let off = a["offset"].as_u64().ok_or("no offset")? as usize * 4;
            let bytes = data
                .get(off..off + n * 4)
                .ok_or_else(|| format!("array {name} runs past the end"))?;
            let v = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            arrays.insert(name, v);
        }
        let mut take = |name: &str, len: usize| -> std::result::Result<Vec<f32>, String> {
            let v = arrays
                .remove(name)
                .ok_or_else(|| format!("array {name} is missing"))?;
            if v.len() != len {
                return Err(format!(
                    "array {name} has {} values, expected {len}",
                    v.len()
                ));
            }
            Ok(v)
        };
        let rows = [5000usize, 1000, 2500, 2500, 50, 50];
        let mut embed = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            embed.push(take(&format!("t2v.embed.{i}"), r * WIDTH)?);
        }
        let mut maxout = |name: &str, n_in: usize| -> std::result::Result<MaxoutLn, String> {
            let w = take(&format!("{name}.W"), WIDTH * 3 * n_in)?;
            let b = take(&format!("{name}.b"), WIDTH * 3)?;
            let (mut wp, mut bp) = (vec![0f32; w.len()], vec![0f32; b.len()]);
            for o in 0..WIDTH {
                for p in 0..3 {
                    let (from, to) = (o * 3 + p, p * WIDTH + o);
                    wp[to * n_in..(to + 1) * n_in]
                        .copy_from_slice(&w[from * n_in..(from + 1) * n_in]);
                    bp[to] = b[from];
                }
            }
            Ok(MaxoutLn {
                w: wp,
                b: bp,
                g: take(&format!("{name}.G"), WIDTH)?,
                ln_b: take(&format!("{name}.ln_b"), WIDTH)?,
                n_in,
                n_out: WIDTH,
                pieces: 3,
            })
        };
        let mix = maxout("t2v.mix", WIDTH * 6)?;
        let enc = (0..4)
            .map(|i| maxout(&format!("t2v.enc.{i}"), WIDTH * 3))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let tags = strings(&header["tags"])?;
        let actions: Vec<Action> = strings(&header["actions"])?
            .into_iter()
            .map(|a| {
                let (m, label) = a.split_once('-').unwrap_or((a.as_str(), ""));
                let mv = match m {
                    "S" => Move::Shift,
                    "D" => Move::Reduce,
                    "L" => Move::Left,
                    "R" => Move::Right,
                    "B" => Move::Break,
                    _ => return Err(format!("unknown parser action {a}")),
                };
                Ok(Action {
                    mv,
                    label: label.to_string(),
                })
            })
            .collect::<std::result::Result<_, String>>()?;
        let nt = tags.len();
        let na = actions.len();
        let tagger_w = take("tagger.W", nt * WIDTH)?;
        let tagger_b = take("tagger.b", nt)?;
        let proj_w = take("parser.proj.W", HIDDEN * WIDTH)?;
        let proj_b = take("parser.proj.b", HIDDEN)?;
        let lower_w = take("parser.lower.W", N_FEATS * HIDDEN * PIECES * HIDDEN)?;
        let lower_b = take("parser.lower.b", HIDDEN * PIECES)?;
        let lower_pad = take("parser.lower.pad", N_FEATS * HIDDEN * PIECES)?;
        let upper_w = take("parser.upper.W", na * HIDDEN)?;
        let upper_b = take("parser.upper.b", na)?;

        let seeds = header["seeds"]
            .as_array()
            .ok_or("no seeds")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as u32)
            .collect();

        let mut ruler = Vec::new();
        for e in header["attribute_ruler"]
            .as_array()
            .ok_or("no attribute_ruler")?
        {
            let patterns = e["patterns"]
                .as_array()
                .ok_or("ruler patterns")?
                .iter()
                .map(|p| {
                    p.as_array()
                        .ok_or_else(|| "ruler pattern".to_string())?
                        .iter()
                        .map(tok_spec)
                        .collect::<std::result::Result<Vec<_>, _>>()
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let attrs = &e["attrs"];
            let get = |k: &str| attrs.get(k).and_then(|v| v.as_str()).map(str::to_string);
            ruler.push(RulerEntry {
                patterns,
                index: e["index"].as_i64().unwrap_or(0),
                pos: get("POS"),
                morph: get("MORPH"),
                lemma: get("LEMMA"),
                tag: get("TAG"),
                dep: get("DEP"),
            });
        }

        // An entry whose every pattern starts with TAG == t can only match
        // at a token tagged t; the rest are tried everywhere.
        let first_tag = |e: &RulerEntry| -> Option<String> {
            let tags: Vec<Option<&str>> = e
                .patterns
                .iter()
                .map(|p| match p.first().and_then(|t| t.tag.as_ref()) {
                    Some(Cond::Eq(t)) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            match tags.first() {
                Some(Some(t)) if tags.iter().all(|x| *x == Some(*t)) => Some(t.to_string()),
                _ => None,
            }
        };
        let ruler_any: Vec<usize> = (0..ruler.len())
            .filter(|&i| first_tag(&ruler[i]).is_none())
            .collect();
        let mut ruler_by_tag: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in ruler.iter().enumerate() {
            if let Some(t) = first_tag(e) {
                ruler_by_tag.entry(t).or_default().push(i);
            }
        }
        for v in ruler_by_tag.values_mut() {
            v.extend(&ruler_any);
            v.sort_unstable();
        }

        let lem = &header["lemma"];
        let mut rules = HashMap::new();
        for (pos, v) in lem["rules"].as_object().ok_or("lemma rules")? {
            let pairs = v
                .as_array()
                .ok_or("lemma rule list")?
                .iter()
                .map(|p| Ok((s(&p[0])?, s(&p[1])?)))
                .collect::<std::result::Result<Vec<_>, String>>()?;
            rules.insert(pos.clone(), pairs);
        }
        let mut exc = HashMap::new();
        for (pos, v) in lem["exc"].as_object().ok_or("lemma exc")? {
            let mut m = HashMap::new();
            for (w, forms) in v.as_object().ok_or("lemma exc table")? {
                m.insert(w.clone(), strings(forms)?);
            }
            exc.insert(pos.clone(), m);
        }
        let mut index = HashMap::new();
        for (pos, v) in lem["index"].as_object().ok_or("lemma index")? {
            index.insert(pos.clone(), strings(v)?.into_iter().collect());
        }

        let mut lexeme_norm = HashMap::new();
        for (k, v) in header["lexeme_norm"].as_object().ok_or("lexeme_norm")? {
            let h: u64 = k.parse().map_err(|_| format!("bad norm key {k}"))?;
            lexeme_norm.insert(h, s(v)?);
        }
        let mut symbols = HashMap::new();
        for (k, v) in header["symbols"].as_object().ok_or("symbols")? {
            symbols.insert(k.clone(), v.as_u64().ok_or("symbol id")?);
        }
        let mut base_norms = HashMap::new();
        for (k, v) in header["base_norms"].as_object().ok_or("base_norms")? {
            base_norms.insert(k.clone(), s(v)?);
        }
        let mut special = HashMap::new();
        for (k, v) in header["special_cases"].as_object().ok_or("special_cases")? {
            let toks = v
                .as_array()
                .ok_or("special case")?
                .iter()
                .map(|t| Ok((s(&t[0])?, t[1].as_str().map(str::to_string))))
                .collect::<std::result::Result<Vec<_>, String>>()?;
            special.insert(k.clone(), toks);
        }
        let set = |k: &str| -> std::result::Result<HashSet<String>, String> {
            Ok(strings(&header[k])?.into_iter().collect())
        };
        let mix_tables = super::nn::mix_tables(&embed, &mix);
        let mut upper_wt = vec![0f32; na * HIDDEN];
        for a in 0..na {
            for j in 0..HIDDEN {
                upper_wt[j * na + a] = upper_w[a * HIDDEN + j];
            }
        }
        let enc0_const = super::nn::zero_window_output(&enc[0]);
        Ok(Model {
            seeds,
            mix_tables,
            enc0_const,
            mix,
            enc,
            tagger_w,
            tagger_b,
            proj_w,
            proj_b,
            lower_w,
            lower_b,
            lower_pad,
            upper_wt,
            upper_b,
            tags,
            actions,
            ruler,
            ruler_by_tag,
            ruler_any,
            lemma: Lemma { rules, exc, index },
            lexeme_norm,
            base_norms,
            symbols,
            special,
            phrasal_verbs: set("phrasal_verbs")?,
            phrasal_preps: set("phrasal_preps")?,
            scene_nouns: set("scene_nouns")?,
        })
    }
}
