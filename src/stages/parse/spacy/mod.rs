//! The `spacy` parse engine: SceneGraphParser 0.1.0's rules over a
//! pure-Rust port of the spaCy en_core_web_sm 3.8.0 pipeline that made
//! the reference parses (tokenizer, tok2vec, tagger, greedy arc-eager
//! parser, attribute ruler, rule lemmatizer, noun chunks). The weights were
//! converted once by scripts/convert_spacy_sm.py and are embedded; nothing
//! is downloaded and no Python runs.

mod doc;
mod model;
mod nn;
mod sgp;
mod state;
mod tokenize;

pub(crate) use doc::Doc;
pub(crate) use model::{bytes as model_bytes, model};

use super::SceneGraph;
use crate::error::Result;

/// Captions per batch of matrix products: large enough to keep the
/// products efficient, small enough to stay in cache.
pub(crate) const BATCH: usize = 64;

/// Tokens, tags, arcs and lemmas of each caption, as spaCy would give them.
pub(crate) fn analyse(captions: &[&str]) -> Result<Vec<Doc>> {
    let m = model()?;
    Ok(captions
        .chunks(BATCH)
        .flat_map(|c| doc::analyse(m, c))
        .collect())
}

/// Scene graphs of `captions`, as SceneGraphParser 0.1.0 with
/// en_core_web_sm 3.8.0 gives them.
pub fn parse_batch(captions: &[&str]) -> Result<Vec<SceneGraph>> {
    parse_batch_with(captions, true)
}

/// [`parse_batch`]; `strict_v010 = false` applies the later upstream fixes.
pub fn parse_batch_with(captions: &[&str], strict_v010: bool) -> Result<Vec<SceneGraph>> {
    let m = model()?;
    Ok(captions
        .chunks(BATCH)
        .flat_map(|c| {
            doc::analyse(m, c)
                .iter()
                .map(|d| sgp::scene_graph(m, d, strict_v010))
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The scene graphs of captions already analysed by [`analyse`].
pub(crate) fn scene_graphs(docs: &[Doc], strict_v010: bool) -> Result<Vec<SceneGraph>> {
    let m = model()?;
    Ok(docs
        .iter()
        .map(|d| sgp::scene_graph(m, d, strict_v010))
        .collect())
}
