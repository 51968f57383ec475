//! The processes of a data-parallel run, as the runner sees them. Rank 0
//! runs the pipeline and is the only writer; the other ranks take part
//! only in stages whose kind trains across ranks ([`Stage::DISTRIBUTED`]),
//! each when rank 0 says it may start.
//!
//! [`Stage::DISTRIBUTED`]: crate::framework::stage::Stage::DISTRIBUTED

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;

/// What rank 0 posts for a distributed stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Rank 0 prepared the stage (its work folder, what it resumes from):
    /// the other ranks may read it and join.
    Go,
    /// The stage is up to date: nothing to join.
    Skip,
}

impl Signal {
    fn text(self) -> &'static str {
        match self {
            Signal::Go => "go",
            Signal::Skip => "skip",
        }
    }
}

/// One rank's view of its run. Implemented by the launcher over libtorch's
/// process group; the framework needs only who is who and a signal that
/// does not time out (rank 0's earlier stages may take hours).
pub trait Ranks: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// This rank's place on its machine (its GPU).
    fn local_rank(&self) -> usize;
    fn set(&self, key: &str, value: &str) -> Result<()>;
    /// Polls until `key` is set (or `timeout` passes: an error); fails
    /// when rank 0 is gone.
    fn wait(&self, key: &str, timeout: Option<Duration>) -> Result<String>;
    /// How long a rank may take to answer once the others are waiting on
    /// it (the collectives' timeout).
    fn timeout(&self) -> Duration;
    /// The process group itself, for the stage kinds that use it.
    fn group(&self) -> &dyn Any;
}

fn stage_key(stage: &str) -> String {
    format!("genecis/stage/{stage}")
}

/// Rank 0: tells the other ranks about `stage`.
pub(crate) fn post(ranks: &dyn Ranks, stage: &str, s: Signal) -> Result<()> {
    ranks.set(&stage_key(stage), s.text())
}

/// A rank other than 0: waits for rank 0's word on `stage`.
pub(crate) fn await_signal(ranks: &dyn Ranks, stage: &str) -> Result<Signal> {
    let v = ranks.wait(&stage_key(stage), None)?;
    Ok(if v == Signal::Go.text() {
        Signal::Go
    } else {
        Signal::Skip
    })
}

fn done_key(rank: usize) -> String {
    format!("genecis/done/{rank}")
}

/// A rank other than 0, at its end: says so, so that rank 0 (whose store
/// the signals live in) does not exit before every rank has read them.
pub(crate) fn leave(ranks: &dyn Ranks) -> Result<()> {
    ranks.set(&done_key(ranks.rank()), "done")
}

/// Rank 0, at its end: waits for the others to [`leave`].
pub(crate) fn await_all(ranks: &dyn Ranks) -> Result<()> {
    for k in 1..ranks.world() {
        ranks.wait(&done_key(k), Some(ranks.timeout()))?;
    }
    Ok(())
}

/// A run's ranks, held by its request.
#[derive(Clone)]
pub struct RankHandle(pub Arc<dyn Ranks>);

impl std::fmt::Debug for RankHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world())
    }
}
