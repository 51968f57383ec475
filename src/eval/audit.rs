//! Benchmark hygiene: templates that are suspect whatever the model.
//!
//! `audit(task, template_id, check, detail)`:
//! - `duplicate_in_gallery`: one image key twice among the distractors;
//! - `target_among_distractors`: the target is also a distractor;
//! - `near_duplicate_target_distractor`: cosine >= 0.99 between the target
//!   and a distractor (needs embeddings);
//! - `near_duplicate_reference_target`: cosine >= 0.99 between the
//!   reference and the target (needs embeddings);
//! - `all_methods_fail_at_3`: every method scored ranks the target below 3;
//! - `singleton_condition`: the condition occurs once in its task;
//! - `reference_in_gallery`: the reference image is also a distractor (or
//!   the target), so image-only retrieval finds a perfect match;
//! - `contaminated`: an image of the template is in a `genecis
//!   contamination` table (score's `contamination` param).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, RecordBatch, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;

pub(crate) const CHECKS: [&str; 8] = [
    "contaminated",
    "reference_in_gallery",
    "duplicate_in_gallery",
    "target_among_distractors",
    "near_duplicate_target_distractor",
    "near_duplicate_reference_target",
    "all_methods_fail_at_3",
    "singleton_condition",
];

pub(crate) static AUDIT_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("template_id", DataType::UInt32, false),
        Field::new("check", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
    ]))
});

/// One GeneCIS template by its image keys.
pub(crate) struct KeyedTemplate<'a> {
    pub task: &'a str,
    pub id: u32,
    pub condition: &'a str,
    pub reference: &'a str,
    pub target: &'a str,
    pub gallery: Vec<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AuditRow {
    pub task: String,
    pub template_id: u32,
    pub check: &'static str,
    pub detail: String,
}

fn row(t: &KeyedTemplate, check: &'static str, detail: String) -> AuditRow {
    AuditRow {
        task: t.task.to_string(),
        template_id: t.id,
        check,
        detail,
    }
}

/// The checks that need only the keys: duplicates, the target among its
/// distractors, conditions that occur once in their task.
pub(crate) fn key_checks(ts: &[KeyedTemplate]) -> Vec<AuditRow> {
    let mut out = Vec::new();
    let mut per_condition: HashMap<(&str, &str), usize> = HashMap::new();
    for t in ts {
        *per_condition.entry((t.task, t.condition)).or_default() += 1;
    }
    for t in ts {
        if t.target == t.reference {
            out.push(row(
                t,
                "reference_in_gallery",
                format!("{} is the reference and the target", t.reference),
            ));
        }
        if let Some(i) = t.gallery.iter().position(|g| *g == t.reference) {
            out.push(row(
                t,
                "reference_in_gallery",
                format!("{} is the reference and distractor {i}", t.reference),
            ));
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for g in &t.gallery {
            *seen.entry(g).or_default() += 1;
        }
        for (k, n) in &seen {
            if *n > 1 {
                out.push(row(
                    t,
                    "duplicate_in_gallery",
                    format!("{k} appears {n} times"),
                ));
            }
        }
        if let Some(i) = t.gallery.iter().position(|g| *g == t.target) {
            out.push(row(
                t,
                "target_among_distractors",
                format!("{} is also distractor {i}", t.target),
            ));
        }
        if per_condition[&(t.task, t.condition)] == 1 {
            out.push(row(
                t,
                "singleton_condition",
                format!("'{}' occurs once in {}", t.condition, t.task),
            ));
        }
    }
    out
}

/// Near-duplicate pictures (cosine >= `near`) under unit embeddings
/// `unit(key)`.
pub(crate) fn embedding_checks<'a>(
    ts: &[KeyedTemplate<'a>],
    unit: &dyn Fn(&str) -> Option<&'a [f32]>,
    near: f32,
) -> Vec<AuditRow> {
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut out = Vec::new();
    for t in ts {
        let (Some(tv), Some(rv)) = (unit(t.target), unit(t.reference)) else {
            continue;
        };
        let c = cos(tv, rv);
        if c >= near && t.target != t.reference {
            out.push(row(
                t,
                "near_duplicate_reference_target",
                format!("cos({}, {}) = {c:.4}", t.reference, t.target),
            ));
        }
        for (i, g) in t.gallery.iter().enumerate() {
            if *g == t.target {
                continue;
            }
            if let Some(gv) = unit(g) {
                let c = cos(tv, gv);
                if c >= near {
                    out.push(row(
                        t,
                        "near_duplicate_target_distractor",
                        format!("cos(target, distractor {i} {g}) = {c:.4}"),
                    ));
                }
            }
        }
    }
    out
}

/// Templates whose target every method ranks below 3; `ranks` maps
/// (task, template id) to (method, rank) pairs.
pub(crate) fn failure_checks(
    ts: &[KeyedTemplate],
    ranks: &HashMap<(String, u32), Vec<(String, u32)>>,
) -> Vec<AuditRow> {
    let mut out = Vec::new();
    for t in ts {
        if let Some(rs) = ranks.get(&(t.task.to_string(), t.id)) {
            if !rs.is_empty() && rs.iter().all(|(_, r)| *r > 3) {
                let d: Vec<String> = rs.iter().map(|(m, r)| format!("{m} {r}")).collect();
                out.push(row(
                    t,
                    "all_methods_fail_at_3",
                    format!("ranks: {}", d.join(", ")),
                ));
            }
        }
    }
    out
}

/// Findings per check, every check listed.
pub(crate) fn counts(rows: &[AuditRow]) -> Vec<(&'static str, usize)> {
    CHECKS
        .iter()
        .map(|c| (*c, rows.iter().filter(|r| r.check == *c).count()))
        .collect()
}

pub(crate) fn batch(rows: &[AuditRow]) -> Result<RecordBatch> {
    let mut task = StringBuilder::new();
    let mut id = UInt32Builder::new();
    let mut check = StringBuilder::new();
    let mut detail = StringBuilder::new();
    for r in rows {
        task.append_value(&r.task);
        id.append_value(r.template_id);
        check.append_value(r.check);
        detail.append_value(&r.detail);
    }
    Ok(RecordBatch::try_new(
        AUDIT_SCHEMA.clone(),
        vec![
            Arc::new(task.finish()) as ArrayRef,
            Arc::new(id.finish()),
            Arc::new(check.finish()),
            Arc::new(detail.finish()),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(id: u32, cond: &'a str, target: &'a str, gallery: Vec<&'a str>) -> KeyedTemplate<'a> {
        KeyedTemplate {
            task: "focus_object",
            id,
            condition: cond,
            reference: "r",
            target,
            gallery,
        }
    }

    #[test]
    fn each_key_defect_is_found_once() {
        let ts = vec![
            t(0, "dog", "a", vec!["b", "b", "c"]),
            t(1, "dog", "a", vec!["a", "c", "d"]),
            t(2, "cat", "a", vec!["b", "c", "d"]),
        ];
        let rows = key_checks(&ts);
        let got: Vec<(u32, &str)> = rows.iter().map(|r| (r.template_id, r.check)).collect();
        assert_eq!(
            got,
            vec![
                (0, "duplicate_in_gallery"),
                (1, "target_among_distractors"),
                (2, "singleton_condition")
            ]
        );
    }

    #[test]
    fn near_duplicates_and_failures() {
        let ts = vec![t(0, "x", "a", vec!["b", "c"])];
        let vecs: HashMap<&str, Vec<f32>> = [
            ("r", vec![1.0, 0.0]),
            ("a", vec![0.0, 1.0]),
            ("b", vec![0.0, 1.0]),
            ("c", vec![1.0, 0.0]),
        ]
        .into_iter()
        .collect();
        let unit = |k: &str| vecs.get(k).map(|v| v.as_slice());
        let rows = embedding_checks(&ts, &unit, 0.99);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].check, "near_duplicate_target_distractor");
        let mut ranks = HashMap::new();
        ranks.insert(
            ("focus_object".to_string(), 0),
            vec![("a".into(), 4), ("b".into(), 9)],
        );
        assert_eq!(failure_checks(&ts, &ranks).len(), 1);
        ranks.insert(
            ("focus_object".to_string(), 0),
            vec![("a".into(), 4), ("b".into(), 3)],
        );
        assert!(failure_checks(&ts, &ranks).is_empty());
    }
}
