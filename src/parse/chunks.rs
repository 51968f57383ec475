//! A learned chunk-role corrector. The Brill tagger and the tag rules leave
//! tokens whose noun-ness disagrees with spaCy's noun chunks ("vector
//! illustration", "the beginning", "light pink roses", "hair today"). Each
//! content token gets a role, outside (O), modifier inside a chunk (M) or
//! head word (H), from a linear model over sparse context features; a role
//! that contradicts the token's tag rewrites the tag before chunking.
//!
//! Trained (averaged perceptron) on the reference parser's entity spans:
//! `genecis parse-train` aligns each span with the tokens, and reports a
//! cross-validated score; the weights ship in `lexicon/chunk_weights.tsv.gz`.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::attach::{fnv, IdHasher};
use super::grammar::Tok;

/// Weights as shipped, gzip-compressed like the attachment weights.
pub static WEIGHTS_TSV: LazyLock<String> =
    LazyLock::new(|| super::attach::gunzip(include_bytes!("lexicon/chunk_weights.tsv.gz")));

pub static DEFAULT: LazyLock<Option<ChunkModel>> = LazyLock::new(|| {
    let m = ChunkModel::from_tsv(&WEIGHTS_TSV);
    (!m.w.is_empty()).then_some(m)
});

/// Roles, in weight-column order.
pub const ROLES: [&str; 3] = ["O", "M", "H"];
pub const O: usize = 0;
pub const M: usize = 1;
pub const H: usize = 2;

#[derive(Debug, Clone, Default)]
pub struct ChunkModel {
    w: HashMap<String, [f32; 3]>,
    by_hash: HashMap<u64, [f32; 3], std::hash::BuildHasherDefault<IdHasher>>,
}

/// Tokens whose role the model decides: the ones a retag can move in or
/// out of a chunk. Determiners, prepositions, pronouns and punctuation keep
/// the rules' reading.
pub fn decidable(tag: &str) -> bool {
    matches!(
        tag,
        "NN" | "NNS"
            | "NNP"
            | "NNPS"
            | "JJ"
            | "JJR"
            | "JJS"
            | "VB"
            | "VBD"
            | "VBG"
            | "VBN"
            | "VBP"
            | "VBZ"
            | "CD"
            | "RB"
    )
}

fn suffix(w: &str, n: usize) -> &str {
    let mut start = w.len().saturating_sub(n);
    while !w.is_char_boundary(start) {
        start += 1;
    }
    &w[start..]
}

/// Calls `f` with the parts of each feature of token `i`; a feature is the
/// concatenation of its parts (hashed without building it when parsing).
pub fn features(t: &[Tok], i: usize, f: &mut impl FnMut(&[&str])) {
    let tag = |k: isize| -> &str {
        let j = i as isize + k;
        if j < 0 {
            "<s>"
        } else {
            t.get(j as usize).map_or("</s>", |x| x.tag)
        }
    };
    let word = |k: isize| -> &str {
        let j = i as isize + k;
        if j < 0 {
            "<s>"
        } else {
            t.get(j as usize).map_or("</s>", |x| x.word.as_str())
        }
    };
    let (w0, t0) = (word(0), tag(0));
    let (tp, tn, tpp, tnn) = (tag(-1), tag(1), tag(-2), tag(2));
    f(&["b"]);
    f(&["t=", t0]);
    f(&["w=", w0]);
    f(&["wt=", w0, "|", t0]);
    f(&["s3=", suffix(w0, 3), "|", t0]);
    f(&["s2=", suffix(w0, 2)]);
    f(&["tp=", tp, "|", t0]);
    f(&["tn=", t0, "|", tn]);
    f(&["tpn=", tp, "|", t0, "|", tn]);
    f(&["tpp=", tpp, "|", tp, "|", t0]);
    f(&["tnn=", t0, "|", tn, "|", tnn]);
    f(&["wp=", word(-1), "|", t0]);
    f(&["wn=", t0, "|", word(1)]);
    f(&["wwp=", word(-1), "|", w0]);
    f(&["wwn=", w0, "|", word(1)]);
    f(&["wtn=", w0, "|", tn]);
    f(&["tpw=", tp, "|", w0]);
    f(&["wnn=", w0, "|", word(2)]);
    // Where the token sits in a run of nouns: compounds and their roots.
    let nounish = |x: &Tok| matches!(x.tag, "NN" | "NNS" | "NNP" | "NNPS");
    let after = t[i + 1..].iter().take_while(|x| nounish(x)).count().min(3);
    let before = t[..i]
        .iter()
        .rev()
        .take_while(|x| nounish(x))
        .count()
        .min(3);
    const N: [&str; 4] = ["0", "1", "2", "3"];
    f(&["run=", N[before], "|", N[after], "|", t0]);
    if w0.bytes().any(|b| b.is_ascii_digit()) {
        f(&["digit|", t0]);
    }
}

impl ChunkModel {
    /// `feature<TAB>wO<TAB>wM<TAB>wH` lines; `#` lines are comments.
    pub fn from_tsv(text: &str) -> ChunkModel {
        let w = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut it = l.split('\t');
                let f = it.next()?;
                let mut v = [0f32; 3];
                for x in &mut v {
                    *x = it.next()?.trim().parse().ok()?;
                }
                Some((f.to_string(), v))
            })
            .collect();
        ChunkModel::from_map(w)
    }

    fn from_map(w: HashMap<String, [f32; 3]>) -> ChunkModel {
        let by_hash = w.iter().map(|(f, v)| (fnv(&[f]), *v)).collect();
        ChunkModel { w, by_hash }
    }

    pub fn to_tsv(&self, header: &str) -> String {
        super::attach::weights_tsv(header, &self.w, |w| {
            format!("{:.2}\t{:.2}\t{:.2}", w[0], w[1], w[2])
        })
    }

    pub fn len(&self) -> usize {
        self.w.len()
    }

    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }

    /// The role of token `i`; ties go to the earliest role.
    /// `prev`: the role given to the token before, if it was decided.
    pub fn role(&self, t: &[Tok], i: usize, prev: Option<usize>) -> usize {
        let mut s = [0f32; 3];
        let mut add = |parts: &[&str]| {
            if let Some(v) = self.by_hash.get(&fnv(parts)) {
                for k in 0..3 {
                    s[k] += v[k];
                }
            }
        };
        features(t, i, &mut add);
        add(&["pr=", prev.map_or("-", |r| ROLES[r]), "|", t[i].tag]);
        super::attach::argmax(&s)
    }

    /// Rewrites the tags that contradict the predicted roles. Roles are
    /// decided on the incoming tags, all at once, so one retag does not
    /// feed the next decision. The roles follow 0.1.0, whose heads keep one
    /// compound level; with `strict_v010 = false` a noun before a noun stays
    /// a noun, so that the whole compound is the head.
    pub fn apply(&self, t: &mut [Tok], strict_v010: bool) {
        let mut roles: Vec<Option<usize>> = Vec::with_capacity(t.len());
        for i in 0..t.len() {
            let prev = roles.last().copied().flatten();
            roles.push(decidable(t[i].tag).then(|| self.role(t, i, prev)));
        }
        for i in (0..t.len()).rev() {
            if let Some(r) = roles[i] {
                let keep = !strict_v010
                    && r == M
                    && is_noun(t[i].tag)
                    && t.get(i + 1).is_some_and(|n| is_noun(n.tag));
                if !keep {
                    retag(&mut t[i], r);
                }
                t[i].role = Some(r);
            }
        }
    }
}

fn is_noun(tag: &str) -> bool {
    matches!(tag, "NN" | "NNS" | "NNP" | "NNPS")
}

/// The tag (and lemma) a token takes for a role its tag contradicts.
fn retag(tok: &mut Tok, role: usize) {
    let noun = is_noun(tok.tag);
    match role {
        H if !noun => {
            let w = tok.word.as_str();
            let plural = w.len() > 3
                && w.ends_with('s')
                && !w.ends_with("ss")
                && !w.ends_with("us")
                && !w.ends_with("is");
            if plural {
                tok.tag = "NNS";
                tok.lemma = pluralizer::pluralize(w, 1, false);
            } else {
                tok.tag = "NN";
                tok.lemma = w.to_string();
            }
        }
        M if noun => tok.tag = "JJ",
        M if matches!(tok.tag, "VBD" | "VBN" | "VBG") => tok.tag = "JJ",
        O if noun => tok.tag = super::verb_reading(&tok.word).unwrap_or("RB"),
        _ => {}
    }
}

/// One training token: its features and the reference role.
#[derive(Debug, Clone)]
pub struct Example {
    pub feats: Vec<String>,
    pub role: usize,
    pub tag: &'static str,
    /// The token before was decided too: the model's role for it is a feature.
    pub after_decided: bool,
}

/// The roles of `t` from a caption's reference entity spans and heads, or
/// None when a span does not line up with the tokens (tokenisation differs).
pub fn reference_roles(t: &[Tok], spans: &[(String, String)]) -> Option<Vec<usize>> {
    let mut role = vec![O; t.len()];
    let mut cursor = 0;
    for (span, head) in spans {
        let words: Vec<&str> = span.split_whitespace().filter(|w| *w != "-").collect();
        if words.is_empty() {
            return None;
        }
        let start = (cursor..=t.len().checked_sub(words.len())?)
            .find(|&p| words.iter().enumerate().all(|(k, w)| t[p + k].word == *w))?;
        for r in &mut role[start..start + words.len()] {
            *r = M;
        }
        for h in head.split_whitespace() {
            let k = (0..words.len())
                .rev()
                .find(|&k| words[k] == h && role[start + k] == M)?;
            role[start + k] = H;
        }
        cursor = start + words.len();
    }
    Some(role)
}

/// Training tokens of one caption (decidable tokens only).
pub fn examples(t: &[Tok], roles: &[usize]) -> Vec<Example> {
    (0..t.len())
        .filter(|&i| decidable(t[i].tag))
        .map(|i| {
            let mut feats = Vec::new();
            features(t, i, &mut |parts| feats.push(parts.concat()));
            Example {
                feats,
                role: roles[i],
                tag: t[i].tag,
                after_decided: i > 0 && decidable(t[i - 1].tag),
            }
        })
        .collect()
}

fn scores(w: &HashMap<String, [f32; 3]>, feats: &[String]) -> [f32; 3] {
    let mut s = [0f32; 3];
    for f in feats {
        if let Some(v) = w.get(f) {
            for k in 0..3 {
                s[k] += v[k];
            }
        }
    }
    s
}

/// Multi-class averaged perceptron, examples in order, `epochs` times.
/// Deterministic.
pub fn train(examples: &[&Example], epochs: usize) -> ChunkModel {
    let mut w: HashMap<String, [f32; 3]> = HashMap::new();
    let mut total: HashMap<String, [f64; 3]> = HashMap::new();
    let mut stamp: HashMap<String, u64> = HashMap::new();
    let mut t: u64 = 0;
    for _ in 0..epochs {
        // Tokens in caption order: the previous role is the model's own.
        let mut prev: Option<usize> = None;
        for ex in examples {
            t += 1;
            let mut feats = ex.feats.clone();
            let p = if ex.after_decided { prev } else { None };
            feats.push(format!("pr={}|{}", p.map_or("-", |r| ROLES[r]), ex.tag));
            let pred = super::attach::argmax(&scores(&w, &feats));
            prev = Some(pred);
            if pred == ex.role {
                continue;
            }
            for f in &feats {
                let cur = w.entry(f.clone()).or_default();
                let last = stamp.entry(f.clone()).or_default();
                let tot = total.entry(f.clone()).or_default();
                for k in 0..3 {
                    tot[k] += cur[k] as f64 * (t - *last) as f64;
                }
                *last = t;
                cur[ex.role] += 1.0;
                cur[pred] -= 1.0;
            }
        }
    }
    let t = t.max(1);
    let mut avg = HashMap::new();
    for (f, cur) in &w {
        let last = stamp.get(f).copied().unwrap_or(0);
        let tot = total.get(f).copied().unwrap_or_default();
        let mut a = [0f32; 3];
        for k in 0..3 {
            a[k] = ((tot[k] + cur[k] as f64 * (t - last) as f64) / t as f64) as f32;
        }
        // Only differences between roles matter: centre, then drop the
        // features that barely move any role.
        let mean = (a[0] + a[1] + a[2]) / 3.0;
        for x in &mut a {
            *x -= mean;
        }
        if a.iter().any(|x| x.abs() >= 0.05) {
            avg.insert(f.clone(), a);
        }
    }
    ChunkModel::from_map(avg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        s.split_whitespace()
            .map(|p| {
                let (w, t) = p.split_once('/').unwrap();
                Tok {
                    word: w.into(),
                    tag: super::super::intern_tag(t),
                    lemma: w.into(),
                    role: None,
                }
            })
            .collect()
    }

    #[test]
    fn reference_spans_line_up_with_tokens() {
        let t = toks("the/DT green/JJ 3d/NNP person/NN carrying/VBG in/IN hands/NNS globe/NN");
        let r = reference_roles(
            &t,
            &[
                ("the green 3d person".into(), "3d person".into()),
                ("hands globe".into(), "hands globe".into()),
            ],
        )
        .unwrap();
        assert_eq!(r, vec![M, M, H, H, O, O, H, H]);
        assert!(reference_roles(&t, &[("blue person".into(), "person".into())]).is_none());
    }

    #[test]
    fn learns_roles_and_round_trips() {
        // "vector" before a noun is a modifier-turned-head; after "the" a
        // VBG is a head.
        let a = toks("leaves/NNS vector/VBP illustration/NN");
        let b = toks("the/DT beginning/VBG of/IN the/DT trail/NN");
        let mut ex = examples(&a, &[O, H, H]);
        ex.extend(examples(&b, &[M, H, O, M, H]));
        let refs: Vec<&Example> = ex.iter().collect();
        let m = train(&refs, 10);
        let back = ChunkModel::from_tsv(&m.to_tsv("test"));
        for model in [&m, &back] {
            let mut x = a.clone();
            model.apply(&mut x, true);
            assert_eq!(x[1].tag, "NN");
            let mut y = b.clone();
            model.apply(&mut y, true);
            assert_eq!(y[1].tag, "NN");
            assert_eq!(y[4].tag, "NN");
        }
    }
}
