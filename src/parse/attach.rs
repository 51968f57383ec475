//! A learned chooser for the predicate pass's two subject decisions. Where
//! a preposition follows a noun phrase, it lists the places the PP may hang
//! on (the noun itself, the nouns and verbs it hangs on in turn, the clause
//! subject, or nowhere); at a verb, the noun phrases that may be its subject
//! (or none). A linear model over sparse features picks one. The rule
//! choice is itself a feature, so the model learns corrections to the rules.
//!
//! It is trained (averaged perceptron) on the reference parser's output: a
//! choice is right when its subject head, with the relations and objects it
//! takes, makes reference triples. `genecis parse-train` trains it and reports a
//! cross-validated score; the weights ship in `lexicon/attach_weights.tsv.gz`.

use std::collections::HashMap;
use std::sync::LazyLock;

/// Weights as shipped, gzip-compressed (the text runs to megabytes; read
/// it with `zcat`). An empty file means rules only.
pub static WEIGHTS_TSV: LazyLock<String> =
    LazyLock::new(|| gunzip(include_bytes!("lexicon/attach_weights.tsv.gz")));

pub static DEFAULT: LazyLock<Option<AttachModel>> = LazyLock::new(|| {
    let m = AttachModel::from_tsv(&WEIGHTS_TSV);
    (!m.w.is_empty()).then_some(m)
});

/// The text of a shipped weights file. They are built into the binary and
/// checked by the tests, so a bad one is a build defect.
pub fn gunzip(bytes: &[u8]) -> String {
    use std::io::Read;
    let mut s = String::new();
    if !bytes.is_empty() {
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut s)
            .expect("shipped weights are valid gzip'd UTF-8");
    }
    s
}

/// A weights file as shipped: gzip with no name or time in the header, so
/// the same weights give the same bytes.
pub fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    e.write_all(text.as_bytes())
        .expect("writing to memory cannot fail");
    e.finish().expect("writing to memory cannot fail")
}

/// rustc's Fx hash: the feature keys are short strings looked up on the
/// hot path of parsing, where SipHash dominated.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let v = u64::from_le_bytes(c.try_into().unwrap());
            self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Map<V> = HashMap<String, V, std::hash::BuildHasherDefault<FxHasher>>;

/// FNV-1a over the concatenation of `parts`: a feature is hashed from its
/// pieces without building its string.
pub fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A weights file: `header` as `#` lines, then one line per feature in
/// feature order (so a retrain on the same data gives the same bytes).
pub fn weights_tsv<V>(
    header: &str,
    w: &HashMap<String, V, impl std::hash::BuildHasher>,
    fmt: impl Fn(&V) -> String,
) -> String {
    let mut v: Vec<(&String, &V)> = w.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    let mut s = String::new();
    for l in header.lines() {
        s.push_str("# ");
        s.push_str(l);
        s.push('\n');
    }
    for (f, w) in v {
        s.push_str(f);
        s.push('\t');
        s.push_str(&fmt(w));
        s.push('\n');
    }
    s
}

/// The hash is already a hash.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Debug, Clone, Default)]
pub struct AttachModel {
    w: Map<f32>,
    /// The same weights by the FNV hash of the feature, for parsing.
    by_hash: HashMap<u64, f32, std::hash::BuildHasherDefault<IdHasher>>,
}

impl AttachModel {
    /// `feature<TAB>weight` lines; `#` lines are comments.
    pub fn from_tsv(text: &str) -> AttachModel {
        let w = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (f, v) = l.rsplit_once('\t')?;
                Some((f.to_string(), v.trim().parse().ok()?))
            })
            .collect();
        AttachModel::from_map(w)
    }

    fn from_map(w: Map<f32>) -> AttachModel {
        let by_hash = w.iter().map(|(f, v)| (fnv(&[f]), *v)).collect();
        AttachModel { w, by_hash }
    }

    /// The weight of the feature spelled by `parts` concatenated.
    pub fn weight_of_parts(&self, parts: &[&str]) -> f32 {
        self.by_hash.get(&fnv(parts)).copied().unwrap_or(0.0)
    }

    pub fn to_tsv(&self, header: &str) -> String {
        weights_tsv(header, &self.w, |w| format!("{w:.4}"))
    }

    /// Favours the rule choice by `bonus`: the model overrides the rules
    /// only when it is that much surer.
    /// `pp` for PP attachments, `verb` for verb subjects.
    pub fn add_rule_bonus(&mut self, pp: f32, verb: f32) {
        for (f, bonus) in [("rule", pp), ("vrule", verb)] {
            *self.w.entry(f.into()).or_default() += bonus;
            *self.by_hash.entry(fnv(&[f])).or_default() += bonus;
        }
    }

    pub fn len(&self) -> usize {
        self.w.len()
    }

    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }

    pub fn weight(&self, feature: &str) -> f32 {
        self.w.get(feature).copied().unwrap_or(0.0)
    }

    pub fn score(&self, feats: &[String]) -> f32 {
        score(&self.w, feats)
    }

    /// Index of the best option; ties go to the earliest.
    pub fn choose(&self, options: &[Vec<String>]) -> usize {
        choose(&self.w, options)
    }
}

fn score(w: &Map<f32>, feats: &[String]) -> f32 {
    feats.iter().filter_map(|f| w.get(f)).sum()
}

fn choose(w: &Map<f32>, options: &[Vec<String>]) -> usize {
    let scores: Vec<f32> = options.iter().map(|o| score(w, o)).collect();
    argmax(&scores)
}

/// Index of the highest score; ties go to the earliest.
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best
}

/// One attachment decision, as recorded for training.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Features of each option.
    pub options: Vec<Vec<String>>,
    /// Subject heads each option gives (the noun and its conjunct, as the
    /// relations expand; empty: no relation).
    pub subjects: Vec<Vec<String>>,
    /// The (relation, object head) pairs the decided subject takes: one for
    /// a PP, those of the verb's object and PPs for a verb subject.
    pub pairs: Vec<(String, String)>,
}

/// A decision with the options that agree with the reference.
#[derive(Debug, Clone)]
pub struct Example {
    pub decision: Decision,
    pub gold: Vec<usize>,
}

/// Averaged perceptron over the examples, in their order, `epochs` times.
/// Deterministic.
pub fn train(examples: &[Example], epochs: usize) -> AttachModel {
    let refs: Vec<&Example> = examples.iter().collect();
    train_refs(&refs, epochs)
}

pub fn train_refs(examples: &[&Example], epochs: usize) -> AttachModel {
    let mut w: Map<f32> = Map::default();
    // Lazy averaging: sum of weights over time via timestamps.
    let mut total: Map<f64> = Map::default();
    let mut stamp: Map<u64> = Map::default();
    let mut t: u64 = 0;
    let mut update = |w: &mut Map<f32>, f: &str, d: f32, t: u64| {
        let cur = *w.get(f).unwrap_or(&0.0);
        let last = *stamp.get(f).unwrap_or(&0);
        *total.entry(f.to_string()).or_default() += cur as f64 * (t - last) as f64;
        stamp.insert(f.to_string(), t);
        w.insert(f.to_string(), cur + d);
    };
    for _ in 0..epochs {
        for ex in examples {
            t += 1;
            let pred = choose(&w, &ex.decision.options);
            if ex.gold.contains(&pred) {
                continue;
            }
            // The best-scoring gold option is the target.
            let target = *ex
                .gold
                .iter()
                .max_by(|&&a, &&b| {
                    score(&w, &ex.decision.options[a])
                        .partial_cmp(&score(&w, &ex.decision.options[b]))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(b.cmp(&a))
                })
                .expect("gold is not empty");
            for f in &ex.decision.options[target] {
                update(&mut w, f, 1.0, t);
            }
            for f in &ex.decision.options[pred] {
                update(&mut w, f, -1.0, t);
            }
        }
    }
    let t = t.max(1);
    let mut avg = Map::default();
    for (f, cur) in &w {
        let last = *stamp.get(f).unwrap_or(&0);
        let sum = total.get(f).copied().unwrap_or(0.0) + *cur as f64 * (t - last) as f64;
        let a = (sum / t as f64) as f32;
        if a.abs() >= 1e-3 {
            avg.insert(f.clone(), a);
        }
    }
    AttachModel::from_map(avg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn perceptron_learns_a_separable_choice_and_round_trips() {
        // Option "b" is right when the prep is "with", "a" otherwise.
        let mut ex = Vec::new();
        for p in ["with", "on", "with", "on", "with"] {
            let d = Decision {
                options: vec![
                    f(&["a", &format!("a|p={p}")]),
                    f(&["b", &format!("b|p={p}")]),
                ],
                subjects: vec![vec!["x".into()], vec!["y".into()]],
                pairs: vec![(p.into(), "o".into())],
            };
            ex.push(Example {
                decision: d,
                gold: vec![if p == "with" { 1 } else { 0 }],
            });
        }
        let m = train(&ex, 20);
        for e in &ex {
            assert_eq!(m.choose(&e.decision.options), e.gold[0]);
        }
        let back = AttachModel::from_tsv(&m.to_tsv("test"));
        for e in &ex {
            assert_eq!(back.choose(&e.decision.options), e.gold[0]);
        }
    }
}
