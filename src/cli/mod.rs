//! The `genecis` command's layer: arguments resolved into one validated
//! command, and the commands that are not pipeline runs.

pub mod args;
pub mod audit;
pub mod compare;
pub mod contamination;
pub mod devtools;
pub mod encode;
pub mod launch;
