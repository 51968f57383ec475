//! SceneGraphParser 0.1.0's rules (sng_parser/backends/spacy_parser.py)
//! over a parsed [`Doc`]: noun chunks become entities, and the
//! dependency arcs between them relations.

use super::doc::Doc;
use super::model::Model;
use crate::stages::parse::{Entity, Relation, SceneGraph};

/// spaCy's English noun_chunks iterator: (start, end, root).
pub(crate) fn noun_chunks(d: &Doc) -> Vec<(usize, usize, usize)> {
    const NP_DEPS: &[&str] = &[
        "oprd",
        "nsubj",
        "dobj",
        "nsubjpass",
        "pcomp",
        "pobj",
        "dative",
        "appos",
        "attr",
        "ROOT",
    ];
    let mut out = Vec::new();
    let mut prev_end: i64 = -1;
    for (i, w) in d.tokens.iter().enumerate() {
        if !matches!(w.pos, "NOUN" | "PROPN" | "PRON") {
            continue;
        }
        let le = d.left_edge(i);
        if le as i64 <= prev_end {
            continue;
        }
        if NP_DEPS.contains(&w.dep) {
            prev_end = i as i64;
            out.push((le, i + 1, i));
        } else if w.dep == "conj" {
            let mut head = w.head;
            let mut guard = 0;
            while d.tokens[head].dep == "conj"
                && d.tokens[head].head < head
                && guard < d.tokens.len()
            {
                head = d.tokens[head].head;
                guard += 1;
            }
            if NP_DEPS.contains(&d.tokens[head].dep) {
                prev_end = i as i64;
                out.push((le, i + 1, i));
            }
        }
    }
    out
}

fn span_text(d: &Doc, start: usize, end: usize) -> String {
    let mut s = String::new();
    for (k, t) in d.tokens[start..end].iter().enumerate() {
        s.push_str(&t.text);
        if t.space_after && start + k + 1 < end {
            s.push(' ');
        }
    }
    s
}

/// The token and its `conj` children: direct ones only in 0.1.0, the
/// whole chain in the later versions (`deep`).
fn flatten_conj(d: &Doc, i: usize, deep: bool) -> Vec<usize> {
    let mut v = vec![i];
    let mut k = 0;
    while k < v.len() {
        let at = v[k];
        for c in d.children(at).filter(|&c| d.tokens[c].dep == "conj") {
            if !v.contains(&c) {
                v.push(c);
            }
        }
        if !deep {
            break;
        }
        k += 1;
    }
    v
}

/// Modifiers and compound words of a chunk root: its direct children in
/// 0.1.0; later versions also walk into the compounds (`deep`), so "ice
/// cream cone" keeps all three words.
fn describe(
    d: &Doc,
    node: usize,
    deep: bool,
    head: &mut String,
    lemma_head: &mut String,
    modifiers: &mut Vec<String>,
    depth: usize,
) {
    let t = &d.tokens;
    for x in d.children(node) {
        match t[x].dep {
            "det" | "nummod" => modifiers.push(t[x].text.clone()),
            "amod" => modifiers.extend(
                flatten_conj(d, x, deep)
                    .into_iter()
                    .map(|y| t[y].text.clone()),
            ),
            "compound" => {
                *head = format!("{} {head}", t[x].text);
                *lemma_head = format!("{} {lemma_head}", t[x].lemma);
                if deep && depth < t.len() {
                    describe(d, x, deep, head, lemma_head, modifiers, depth + 1);
                }
            }
            _ => {}
        }
    }
}

/// SceneGraphParser's graph of a parsed caption: 0.1.0 (`strict`), or with
/// the later upstream fixes: recursive compounds and conjunctions, no
/// pronoun entities, PPs on a copula ("the dog is on the bed"), and
/// "in front of" / "next to" after a verb or copula given to its subject.
pub(crate) fn scene_graph(m: &Model, d: &Doc, strict: bool) -> SceneGraph {
    let t = &d.tokens;
    let deep = !strict;
    let chunks: Vec<(usize, usize, usize)> = noun_chunks(d)
        .into_iter()
        .filter(|&(_, _, root)| strict || t[root].pos != "PRON")
        .collect();
    let mut entities = Vec::new();
    for &(start, end, root) in &chunks {
        let mut head = t[root].text.clone();
        let mut lemma_head = t[root].lemma.clone();
        let mut modifiers = Vec::new();
        describe(d, root, deep, &mut head, &mut lemma_head, &mut modifiers, 0);
        let last = lemma_head.rsplit(' ').next().unwrap_or("");
        let kind = if m.scene_nouns.contains(&lemma_head) || m.scene_nouns.contains(last) {
            "scene"
        } else {
            "unknown"
        };
        entities.push(Entity {
            span: span_text(d, start, end),
            head,
            lemma_head,
            modifiers,
            kind,
        });
    }

    let n = t.len();
    let mut subj: Vec<Option<usize>> = vec![None; n];
    for (i, tok) in t.iter().enumerate() {
        if tok.dep == "nsubj" {
            subj[tok.head] = Some(i);
        } else if tok.dep == "acl" {
            subj[i] = Some(tok.head);
        } else if tok.dep == "pobj"
            && t[tok.head].dep == "agent"
            && t[t[tok.head].head].pos == "VERB"
        {
            subj[t[tok.head].head] = Some(i);
        }
    }

    // Later versions: a copula's subject is its nsubj too (already in
    // `subj`), and PP rules accept AUX where 0.1.0 wants VERB.
    let verbish = |i: usize| t[i].pos == "VERB" || (!strict && t[i].pos == "AUX");
    // (subject token, object token, relation text)
    let mut rels: Vec<(usize, usize, String)> = Vec::new();
    let mut fake = vec![false; n];
    for &(_, _, e) in &chunks {
        let h = t[e].head;
        let hh = t[h].head;
        if matches!(t[e].dep, "dobj" | "attr") && subj[h].is_some() {
            rels.push((subj[h].unwrap(), e, t[h].text.clone()));
        } else if t[e].dep == "pobj" {
            let hhh = t[hh].head;
            let prep_span = || span_text(d, hhh.min(h + 1), h + 1).to_lowercase();
            if t[h].dep == "agent" {
            } else if t[hh].pos == "VERB"
                && hh + 1 == h
                && m.phrasal_verbs
                    .contains(&format!("{} {}", t[hh].lemma, t[h].lemma))
                && subj[hh].is_some()
            {
                rels.push((
                    subj[hh].unwrap(),
                    e,
                    format!("{} {}", t[hh].text, t[h].text),
                ));
            } else if (verbish(hh) || t[hh].dep == "acl") && subj[hh].is_some() {
                rels.push((subj[hh].unwrap(), e, t[h].text.clone()));
            } else if t[hh].dep == "pobj" && hhh <= h && m.phrasal_preps.contains(&prep_span()) {
                fake[hh] = true;
                let above = t[hhh].head;
                // 0.1.0 keeps the raw token, so after a verb the relation is
                // dropped; later versions map a verb or copula to its subject.
                let s = if !strict && verbish(above) {
                    subj[above]
                } else {
                    Some(above)
                };
                if let Some(s) = s {
                    rels.push((s, e, span_text(d, hhh, h + 1)));
                }
            } else if t[hh].pos == "NOUN" {
                rels.push((hh, e, t[h].text.clone()));
            } else if matches!(t[hh].dep, "amod" | "advmod") && t[hhh].pos == "NOUN" {
                rels.push((hhh, e, format!("{} {}", t[hh].text, t[h].text)));
            } else if (matches!(t[hh].dep, "amod" | "advmod") || !strict && t[hh].dep == "acomp")
                && verbish(hhh)
                && subj[hhh].is_some()
            {
                rels.push((
                    subj[hhh].unwrap(),
                    e,
                    format!("{} {}", t[hh].text, t[h].text),
                ));
            }
        } else if t[e].dep == "nsubjpass" && subj[h].is_some() {
            rels.push((subj[h].unwrap(), e, t[h].text.clone()));
        }
    }

    let kept: Vec<usize> = (0..chunks.len()).filter(|&k| !fake[chunks[k].2]).collect();
    let entities: Vec<Entity> = kept.iter().map(|&k| entities[k].clone()).collect();
    let locate = |i: usize| {
        kept.iter()
            .position(|&k| chunks[k].0 <= i && i < chunks[k].1)
    };
    let mut relations = Vec::new();
    for (s, o, r) in rels {
        for x in flatten_conj(d, s, deep) {
            for y in flatten_conj(d, o, deep) {
                if let (Some(a), Some(b)) = (locate(x), locate(y)) {
                    relations.push(Relation {
                        subject: a,
                        relation: r.clone(),
                        object: b,
                    });
                }
            }
        }
    }
    SceneGraph {
        entities,
        relations,
    }
}
