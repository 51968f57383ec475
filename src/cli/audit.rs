//! `genecis audit`: the benchmark-hygiene checks on template files, or
//! the findings of a run's score stages.

use crate::error::{Error, Result};
use crate::eval::audit::{counts, key_checks, AuditRow, KeyedTemplate, CHECKS};
use crate::eval::template_file::read_template_file;
use crate::framework::store;

/// `genecis audit`: template files get the key checks; a manifest or
/// workdir gets the counts of its score stages' audit tables.
pub fn audit_cli(targets: &[std::path::PathBuf]) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    if targets.is_empty() {
        return Err(Error::Usage {
            arg: "TARGETS".into(),
            message: "name template .json files, or a manifest or workdir".into(),
        });
    }
    for t in targets {
        if t.extension().is_some_and(|e| e == "json") {
            let file = read_template_file(t).map_err(Error::Data)?;
            let task = t
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let keyed: Vec<(u32, String, String, String, Vec<String>)> = file
                .ok
                .iter()
                .map(|(i, t)| {
                    (
                        *i as u32,
                        t.condition.clone(),
                        t.reference.key(),
                        t.target.key(),
                        t.gallery.iter().map(|g| g.key()).collect(),
                    )
                })
                .collect();
            let ts: Vec<KeyedTemplate> = keyed
                .iter()
                .map(|(id, c, r, g, gal)| KeyedTemplate {
                    task: &task,
                    id: *id,
                    condition: c,
                    reference: r,
                    target: g,
                    gallery: gal.iter().map(String::as_str).collect(),
                })
                .collect();
            let rows = key_checks(&ts);
            let _ = writeln!(
                out,
                "{}: {} templates ({} malformed)",
                t.display(),
                ts.len(),
                file.bad.len()
            );
            for (c, n) in counts(&rows) {
                if matches!(
                    c,
                    "reference_in_gallery"
                        | "duplicate_in_gallery"
                        | "target_among_distractors"
                        | "singleton_condition"
                ) {
                    let _ = writeln!(out, "  {c:<34} {n}");
                }
            }
            for r in rows.iter().take(10) {
                let _ = writeln!(out, "    #{} {}: {}", r.template_id, r.check, r.detail);
            }
            if rows.len() > 10 {
                let _ = writeln!(out, "    ... {} more", rows.len() - 10);
            }
        } else {
            let (workdir, run) = store::open_target(t)?;
            let mut found = false;
            let dirs: Vec<_> = store::committed(&workdir, &run)?
                .into_iter()
                .map(|(_, d)| d)
                .filter(|d| d.join("audit").is_dir())
                .collect();
            for d in dirs {
                found = true;
                let mut rows = Vec::new();
                for b in store::read_table(&d.join("audit"))? {
                    use arrow::array::AsArray;
                    let col = |n: &str| store::column(&b, n).cloned();
                    let (task, id, check, detail) = (
                        col("task")?,
                        col("template_id")?,
                        col("check")?,
                        col("detail")?,
                    );
                    let id = id.as_primitive::<arrow::datatypes::UInt32Type>();
                    for i in 0..b.num_rows() {
                        let check = check.as_string::<i32>().value(i);
                        let Some(c) = CHECKS.iter().find(|c| **c == check) else {
                            continue;
                        };
                        rows.push(AuditRow {
                            task: task.as_string::<i32>().value(i).to_string(),
                            template_id: id.value(i),
                            check: c,
                            detail: detail.as_string::<i32>().value(i).to_string(),
                        });
                    }
                }
                let _ = writeln!(out, "{}: {} finding(s)", d.display(), rows.len());
                for (c, n) in counts(&rows) {
                    let _ = writeln!(out, "  {c:<34} {n}");
                }
            }
            if !found {
                return Err(Error::Data(format!(
                    "{} has no committed score stage (its audit table): run the pipeline first",
                    workdir.display()
                )));
            }
        }
    }
    Ok(out)
}
