//! `genecis compare A B`: two runs' `scores` on the same templates (two
//! models, two seeds, two settings), per task and on the average: R@1 of
//! each, the paired bootstrap interval of the difference, McNemar's exact
//! test and the templates won and lost.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use arrow::array::AsArray;
use arrow::datatypes::UInt32Type;

use crate::error::{Error, Result};
use crate::eval::hits;
use crate::eval::stats::{paired, Paired};
use crate::eval::TASKS;
use crate::framework::store::{column, read_table};

/// What to compare, validated.
pub struct CompareRequest {
    pub a: PathBuf,
    pub b: PathBuf,
    pub method: Option<String>,
    pub task: Option<String>,
    /// Compare the templates both runs scored when their sets differ.
    pub common: bool,
    pub format: CompareFormat,
    pub bootstrap: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareFormat {
    Table,
    Csv,
    Json,
}

/// (task, template_id) -> target rank, for one method of one run.
type Ranks = BTreeMap<(String, u32), u32>;

/// A run's `scores` table: by method, the ranks of each template.
fn read_scores(target: &Path) -> Result<(PathBuf, BTreeMap<String, Ranks>)> {
    let (workdir, run) = crate::framework::store::open_target(target)?;
    let stages: Vec<PathBuf> = crate::framework::store::committed(&workdir, &run)?
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d.join("scores").is_dir())
        .collect();
    let dir = match stages.as_slice() {
        [one] => one.join("scores"),
        [] => {
            return Err(Error::Data(format!(
                "{} has no committed score stage: run its pipeline first",
                workdir.display()
            )))
        }
        _ => {
            return Err(Error::Usage {
                arg: target.display().to_string(),
                message: format!(
                    "holds several score stages ({}): pass the stage's folder, e.g. {}",
                    stages
                        .iter()
                        .filter_map(|s| s.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    stages[0].display()
                ),
            })
        }
    };
    let mut out: BTreeMap<String, Ranks> = BTreeMap::new();
    for b in read_table(&dir)? {
        let task = column(&b, "task")?.as_string::<i32>().clone();
        let id = column(&b, "template_id")?
            .as_primitive::<UInt32Type>()
            .clone();
        let method = column(&b, "method")?.as_string::<i32>().clone();
        let rank = column(&b, "target_rank")?
            .as_primitive::<UInt32Type>()
            .clone();
        for i in 0..b.num_rows() {
            out.entry(method.value(i).to_string())
                .or_default()
                .insert((task.value(i).to_string(), id.value(i)), rank.value(i));
        }
    }
    Ok((dir, out))
}

/// One compared row: a task, or `average` (over the GeneCIS tasks).
struct Row {
    task: String,
    method: String,
    r1_a: f64,
    r1_b: f64,
    p: Paired,
}

fn rate(h: &[Vec<bool>]) -> f64 {
    h.iter()
        .map(|s| s.iter().filter(|&&x| x).count() as f64 / s.len().max(1) as f64)
        .sum::<f64>()
        / h.len().max(1) as f64
}

/// Runs the comparison and renders it.
pub fn compare(req: &CompareRequest) -> Result<String> {
    let (dir_a, a) = read_scores(&req.a)?;
    let (dir_b, b) = read_scores(&req.b)?;
    let methods: Vec<&String> = a
        .keys()
        .filter(|m| b.contains_key(*m))
        .filter(|m| req.method.as_ref().is_none_or(|x| x == *m))
        .collect();
    if methods.is_empty() {
        return Err(Error::Usage {
            arg: "--method".into(),
            message: format!(
                "no method scored by both runs{} (A: {}; B: {})",
                req.method
                    .as_ref()
                    .map(|m| format!(" named '{m}'"))
                    .unwrap_or_default(),
                a.keys().cloned().collect::<Vec<_>>().join(", "),
                b.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let mut rows = Vec::new();
    for m in methods {
        let (ra, rb) = (&a[m], &b[m]);
        let keep = |k: &(String, u32)| req.task.as_ref().is_none_or(|t| *t == k.0);
        let ka: BTreeSet<&(String, u32)> = ra.keys().filter(|k| keep(k)).collect();
        let kb: BTreeSet<&(String, u32)> = rb.keys().filter(|k| keep(k)).collect();
        if ka != kb && !req.common {
            let only = |x: &BTreeSet<&(String, u32)>, y: &BTreeSet<&(String, u32)>| {
                let tasks: BTreeSet<&str> = x.difference(y).map(|k| k.0.as_str()).collect();
                (
                    x.difference(y).count(),
                    tasks.into_iter().collect::<Vec<_>>().join(", "),
                )
            };
            let (na, ta) = only(&ka, &kb);
            let (nb, tb) = only(&kb, &ka);
            return Err(Error::Usage {
                arg: "A B".into(),
                message: format!(
                    "the runs scored different templates for method {m}: {na} only in A ({}; tasks {ta}), {nb} only in B ({}; tasks {tb}). Pass --common to compare the {} templates both scored",
                    dir_a.display(),
                    dir_b.display(),
                    ka.intersection(&kb).count()
                ),
            });
        }
        let common: Vec<&(String, u32)> = ka.intersection(&kb).copied().collect();
        let mut by_task: BTreeMap<&str, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        for k in &common {
            let e = by_task.entry(k.0.as_str()).or_default();
            e.0.push(ra[*k]);
            e.1.push(rb[*k]);
        }
        let mut tasks: Vec<&str> = by_task.keys().copied().collect();
        tasks.sort_by_key(|t| (TASKS.iter().position(|x| x == t).unwrap_or(TASKS.len()), *t));
        let one = |names: &[&str]| -> Row {
            let ha: Vec<Vec<bool>> = names.iter().map(|t| hits(&by_task[t].0, 1)).collect();
            let hb: Vec<Vec<bool>> = names.iter().map(|t| hits(&by_task[t].1, 1)).collect();
            let sa: Vec<&[bool]> = ha.iter().map(Vec::as_slice).collect();
            let sb: Vec<&[bool]> = hb.iter().map(Vec::as_slice).collect();
            let task = if names.len() == 1 {
                names[0]
            } else {
                "average"
            };
            let seed = [req.seed, blake3::hash(task.as_bytes()).as_bytes()[0] as u64];
            Row {
                task: task.to_string(),
                method: m.clone(),
                r1_a: rate(&ha),
                r1_b: rate(&hb),
                p: paired(&sa, &sb, req.bootstrap, &seed),
            }
        };
        for t in &tasks {
            rows.push(one(&[t]));
        }
        let genecis: Vec<&str> = tasks
            .iter()
            .copied()
            .filter(|t| TASKS.contains(t))
            .collect();
        if genecis.len() > 1 {
            rows.push(one(&genecis));
        }
    }
    Ok(render(&rows, req.format))
}

fn render(rows: &[Row], format: CompareFormat) -> String {
    let fields = |r: &Row| {
        (
            r.task.clone(),
            r.method.clone(),
            r.p.n,
            100.0 * r.r1_a,
            100.0 * r.r1_b,
            100.0 * r.p.delta,
            100.0 * r.p.lo,
            100.0 * r.p.hi,
            r.p.p_value,
            r.p.a_only,
            r.p.b_only,
        )
    };
    match format {
        CompareFormat::Csv => {
            let mut s =
                String::from("task,method,n,r1_a,r1_b,delta,lo,hi,p_value,won_by_a,won_by_b\n");
            for r in rows {
                let f = fields(r);
                s.push_str(&format!(
                    "{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.6},{},{}\n",
                    f.0, f.1, f.2, f.3, f.4, f.5, f.6, f.7, f.8, f.9, f.10
                ));
            }
            s
        }
        CompareFormat::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let f = fields(r);
                    serde_json::json!({
                        "task": f.0, "method": f.1, "n": f.2, "r1_a": f.3, "r1_b": f.4,
                        "delta": f.5, "lo": f.6, "hi": f.7, "p_value": f.8,
                        "won_by_a": f.9, "won_by_b": f.10,
                    })
                })
                .collect();
            format!("{}\n", serde_json::Value::Array(v))
        }
        CompareFormat::Table => {
            let mut s = format!(
                "{:<18} {:<16} {:>5} {:>7} {:>7} {:>7} {:>17} {:>8} {:>5} {:>5}\n",
                "task",
                "method",
                "n",
                "R@1 A",
                "R@1 B",
                "A - B",
                "95% interval",
                "p",
                "A won",
                "B won"
            );
            for r in rows {
                let f = fields(r);
                s.push_str(&format!(
                    "{:<18} {:<16} {:>5} {:>7.1} {:>7.1} {:>+7.1} {:>8.1} to {:>5.1} {:>8.4} {:>5} {:>5}{}\n",
                    f.0,
                    f.1,
                    f.2,
                    f.3,
                    f.4,
                    f.5,
                    f.6,
                    f.7,
                    f.8,
                    f.9,
                    f.10,
                    if f.8 < 0.05 { " *" } else { "" }
                ));
            }
            s.push_str("R@1 in %; the interval is the paired bootstrap's (templates resampled for both runs, within each task for the average); p is McNemar's exact test; * marks p < 0.05.\n");
            s
        }
    }
}
