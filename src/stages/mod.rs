//! Every stage kind, one file or folder each, and the registry that names
//! them. A kind depends on the framework, `tables`, `eval` and `model`,
//! never on another kind. Adding a kind: its file here, one line in
//! [`KINDS`], its test in `tests/it/`.

use crate::framework::stage::{Kind, Registry};

pub(crate) mod embed;
pub(crate) mod import_parses;
pub(crate) mod import_scores;
pub(crate) mod ingest;
pub(crate) mod mine;
pub mod parse;
pub(crate) mod pretrain;
pub(crate) mod score;
pub(crate) mod synth;
pub(crate) mod templates;
pub mod train;

/// Every stage kind, by its manifest name, in the order `genecis kinds`
/// lists them.
pub static KINDS: Registry = Registry(&[
    &Kind::<synth::Synth>::new(),
    &Kind::<ingest::Ingest>::new(),
    &Kind::<parse::Parse>::new(),
    &Kind::<import_parses::ImportParses>::new(),
    &Kind::<mine::Mine>::new(),
    &Kind::<templates::Templates>::new(),
    &Kind::<embed::Embed>::new(),
    &Kind::<import_scores::ImportScores>::new(),
    &Kind::<score::Score>::new(),
    &Kind::<pretrain::Pretrain>::new(),
    &Kind::<train::Train>::new(),
]);
