//! `import-scores`: scores of methods run anywhere (Python, JAX), checked
//! against the run's templates and written as tables `score` ranks
//! beside its own methods, under the same protocol (tie rule, audit,
//! intervals, report).
//!
//! Two ways in:
//! - similarities: `(task, template_id, method, similarities)`, one value
//!   per candidate in the template's order (target first, then
//!   `gallery_keys`): the four GeneCIS tasks;
//! - embeddings (`gallery` set): `(task, template_id, method, embedding)`
//!   queries plus `(method?, image_key, embedding)` gallery features,
//!   ranked by cosine like the built-in methods: every task, global ones
//!   (CIRR, MIT-States) included.
//!
//! Every template of the run must be there exactly once per method, with
//! the right number of finite values; otherwise the stage fails naming a
//! few offending rows and their count, and writes nothing.
//!
//! Tables (schemas in [`crate::tables::imported`]): `imported_scores`,
//! `imported_queries`, `imported_gallery`.

mod file;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt32Type;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::BUILT_IN;
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::tables::imported::{
    gallery_batch, template_batch, Row, GALLERY_SCHEMA, QUERIES_SCHEMA, SCORES_SCHEMA,
};
use file::UserTable;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportScoresParams {
    /// Similarities, or query embeddings when `gallery` is set.
    pub file: PathBuf,
    /// Gallery embeddings `(method?, image_key, embedding)`: the file then
    /// holds query embeddings.
    #[serde(default)]
    pub gallery: Option<PathBuf>,
    /// The method's name when the files have no `method` column.
    #[serde(default)]
    pub method: Option<String>,
}

pub(crate) struct ImportScores;

/// How many offending rows an error names.
const SHOWN: usize = 5;

impl Stage for ImportScores {
    const KIND: &'static str = "import-scores";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "scores or query/gallery embeddings from any model (Parquet, CSV, .npz), checked against templates -> imported_scores, imported_queries, imported_gallery";
    type Params = ImportScoresParams;
    type Work = ();

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[
            InputTable::required("templates"),
            InputTable::optional("galleries"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("imported_scores", SCORES_SCHEMA.clone()),
            TableDef::new("imported_queries", QUERIES_SCHEMA.clone()),
            TableDef::new("imported_gallery", GALLERY_SCHEMA.clone()),
        ]
    }

    fn validate(p: &ImportScoresParams, _base: &Path) -> Vec<Finding> {
        match &p.method {
            Some(m) => method_name_problem(m)
                .map(|e| vec![Finding::error("method", e)])
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn files(p: &ImportScoresParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut v = vec![("file", resolve_path(base, &p.file))];
        v.extend(p.gallery.iter().map(|g| ("gallery", resolve_path(base, g))));
        v
    }

    fn plan(_p: &ImportScoresParams, _ctx: &StageContext) -> Result<Chunks<()>> {
        Ok(Chunks::single((), 1, "files"))
    }

    fn run_shared(
        p: &ImportScoresParams,
        _w: &(),
        _k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let run = RunTemplates::read(ctx.input("templates")?, ctx.optional_input("galleries"))?;
        let file = UserTable::read(&ctx.resolve(&p.file))?;
        let empty = |queries: bool| template_batch(&[], queries);
        let tables = match &p.gallery {
            None => {
                let rows = template_rows(&file, "similarities", p.method.as_deref())?;
                let rows = check_similarities(&run, &file.path, rows)?;
                let methods: BTreeSet<&str> = rows.iter().map(|r| r.method.as_str()).collect();
                for t in run.global_tasks() {
                    ctx.note(format!(
                        "{t} ranks a whole gallery: imported similarities do not cover it; import query and gallery embeddings (params.gallery) to score it"
                    ));
                }
                ctx.note(format!(
                    "imported {} template scores of {}",
                    rows.len(),
                    methods.into_iter().collect::<Vec<_>>().join(", ")
                ));
                vec![
                    ("imported_scores", template_batch(&rows, false)?),
                    ("imported_queries", empty(true)?),
                    ("imported_gallery", gallery_batch(&[])?),
                ]
            }
            Some(g) => {
                let rows = template_rows(&file, "embedding", p.method.as_deref())?;
                let rows = check_queries(&run, &file.path, rows)?;
                let gallery = UserTable::read(&ctx.resolve(g))?;
                let grows = check_gallery(&run, &gallery, &rows, p.method.as_deref())?;
                ctx.note(format!(
                    "imported {} query and {} gallery embeddings",
                    rows.len(),
                    grows.len()
                ));
                vec![
                    ("imported_scores", empty(false)?),
                    ("imported_queries", template_batch(&rows, true)?),
                    ("imported_gallery", gallery_batch(&grows)?),
                ]
            }
        };
        Ok(Some(tables))
    }
}

/// Why a name cannot be an imported method's, if it cannot.
fn method_name_problem(m: &str) -> Option<String> {
    if m.trim().is_empty() {
        Some("a method needs a name".into())
    } else if BUILT_IN.contains(&m) {
        Some(format!(
            "'{m}' is a built-in method of score ({}): give the imported one another name",
            BUILT_IN.join(", ")
        ))
    } else {
        None
    }
}

/// The run's templates: each GeneCIS template's candidate count, each
/// global task's templates and gallery keys.
struct RunTemplates {
    /// (task, id) -> candidates (target + gallery), None for global ones.
    templates: BTreeMap<(String, u32), Option<usize>>,
    /// Every image a query is compared with: candidates and global galleries.
    images: BTreeSet<String>,
}

impl RunTemplates {
    fn read(templates: &Path, galleries: Option<&Path>) -> Result<RunTemplates> {
        let galleries = crate::eval::read_galleries(galleries).map_err(Error::Data)?;
        let mut out = RunTemplates {
            templates: BTreeMap::new(),
            images: BTreeSet::new(),
        };
        let col = crate::framework::store::column;
        for b in crate::framework::store::read_table(templates)? {
            let task = col(&b, "task")?.as_string::<i32>().clone();
            let id = col(&b, "template_id")?.as_primitive::<UInt32Type>().clone();
            let target = col(&b, "target_key")?.as_string::<i32>().clone();
            let gallery = col(&b, "gallery_keys")?.as_list::<i32>().clone();
            let set = col(&b, "gallery_set")?.as_string::<i32>().clone();
            for i in 0..b.num_rows() {
                let n = if set.is_valid(i) {
                    let keys = galleries.get(set.value(i)).ok_or_else(|| {
                        Error::Data(format!(
                            "{} ranks the gallery '{}': list the templates stage itself in this stage's inputs, so its galleries table comes too",
                            task.value(i),
                            set.value(i)
                        ))
                    })?;
                    out.images.extend(keys.iter().cloned());
                    None
                } else {
                    let g = gallery.value(i);
                    let g = g.as_string::<i32>();
                    out.images.insert(target.value(i).to_string());
                    out.images.extend(g.iter().flatten().map(str::to_string));
                    Some(1 + g.len())
                };
                out.templates
                    .insert((task.value(i).to_string(), id.value(i)), n);
            }
        }
        Ok(out)
    }

    fn global_tasks(&self) -> BTreeSet<&str> {
        self.templates
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|((t, _), _)| t.as_str())
            .collect()
    }
}

/// The file's rows: (task, template_id, method, values); a row whose
/// fields are missing or unreadable is a problem.
fn template_rows(
    f: &UserTable,
    values: &str,
    method: Option<&str>,
) -> Result<Vec<std::result::Result<Row, String>>> {
    let task = f.text("task")?;
    let id = f.ints("template_id")?;
    let methods = match (f.has("method"), method) {
        (true, _) => f.text("method")?,
        (false, Some(m)) => vec![Some(m.to_string()); f.n],
        (false, None) => {
            return Err(bad_file(
                &f.path,
                "no method column: add one, or set params.method".into(),
            ))
        }
    };
    let vals = f.values(values)?;
    Ok((0..f.n)
        .map(|i| {
            let at = format!("row {i}");
            let task = task[i].clone().ok_or(format!("{at}: no task"))?;
            let id = id[i]
                .and_then(|x| u32::try_from(x).ok())
                .ok_or(format!("{at}: template_id is not a non-negative integer"))?;
            let method = methods[i].clone().ok_or(format!("{at}: no method"))?;
            if let Some(e) = method_name_problem(&method) {
                return Err(format!("{at}: {e}"));
            }
            let values = vals[i].clone().ok_or(format!(
                "{at} ({task} {id}): {values} is missing or not a list of numbers"
            ))?;
            Ok(Row {
                task,
                template_id: id,
                method,
                values,
            })
        })
        .collect())
}

fn bad_file(path: &Path, message: String) -> Error {
    Error::BadInputFile {
        what: "imported scores file",
        path: path.to_path_buf(),
        message,
        advice: "every template of the run once per method, as the README's import-scores section shows; nothing was written",
    }
}

/// Problems found, their count and the first few, as one error.
fn fail_with(path: &Path, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = problems.iter().take(SHOWN).map(String::as_str).collect();
    Err(bad_file(
        path,
        format!(
            "{} problem(s), the first {}: {}",
            problems.len(),
            shown.len(),
            shown.join("; ")
        ),
    ))
}

/// Rows keyed and checked against the run: known template, once per
/// method, finite values; then every method covers `needed`.
fn check_rows(
    run: &RunTemplates,
    path: &Path,
    rows: Vec<std::result::Result<Row, String>>,
    what: &str,
    per_row: impl Fn(&Row, Option<usize>) -> Option<String>,
    needed: impl Fn(Option<usize>) -> bool,
) -> Result<Vec<Row>> {
    let mut problems = Vec::new();
    let mut seen: HashMap<(String, String, u32), usize> = HashMap::new();
    let mut ok = Vec::new();
    for (i, r) in rows.into_iter().enumerate() {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let at = format!("row {i} ({} {} {})", r.method, r.task, r.template_id);
        let Some(&n) = run.templates.get(&(r.task.clone(), r.template_id)) else {
            problems.push(format!("{at}: not a template of this run"));
            continue;
        };
        if let Some(first) = seen.insert((r.method.clone(), r.task.clone(), r.template_id), i) {
            problems.push(format!("{at}: the template is also in row {first}"));
            continue;
        }
        if r.values.iter().any(|v| !v.is_finite()) {
            problems.push(format!("{at}: a {what} value is NaN, infinite or missing"));
            continue;
        }
        if let Some(e) = per_row(&r, n) {
            problems.push(format!("{at}: {e}"));
            continue;
        }
        ok.push(r);
    }
    let methods: BTreeSet<String> = seen.keys().map(|k| k.0.clone()).collect();
    for m in &methods {
        let missing: Vec<&(String, u32)> = run
            .templates
            .iter()
            .filter(|(k, &n)| needed(n) && !seen.contains_key(&(m.clone(), k.0.clone(), k.1)))
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "method {m} lacks {} template(s), e.g. {}",
                missing.len(),
                missing
                    .iter()
                    .take(3)
                    .map(|(t, i)| format!("{t} {i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if methods.is_empty() && problems.is_empty() {
        problems.push("the file has no rows".into());
    }
    fail_with(path, problems)?;
    ok.sort_by(|a, b| {
        (&a.method, &a.task, a.template_id).cmp(&(&b.method, &b.task, b.template_id))
    });
    Ok(ok)
}

fn check_similarities(
    run: &RunTemplates,
    path: &Path,
    rows: Vec<std::result::Result<Row, String>>,
) -> Result<Vec<Row>> {
    check_rows(
        run,
        path,
        rows,
        "similarity",
        |r, n| {
            match n {
            None => Some(format!(
                "{} ranks a whole gallery: import query and gallery embeddings (params.gallery) for it",
                r.task
            )),
            Some(n) if n != r.values.len() => Some(format!(
                "{} similarities, the template has {n} candidates (target first, then its gallery_keys)",
                r.values.len()
            )),
            _ => None,
        }
        },
        |n| n.is_some(),
    )
}

fn check_queries(
    run: &RunTemplates,
    path: &Path,
    rows: Vec<std::result::Result<Row, String>>,
) -> Result<Vec<Row>> {
    let rows = check_rows(
        run,
        path,
        rows,
        "embedding",
        |r, _| r.values.is_empty().then(|| "an empty embedding".into()),
        |_| true,
    )?;
    // One width per method: the most common one; others are problems.
    let mut counts: BTreeMap<(&str, usize), usize> = BTreeMap::new();
    for r in &rows {
        *counts.entry((&r.method, r.values.len())).or_default() += 1;
    }
    let mut width: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (&(m, w), &n) in &counts {
        let e = width.entry(m).or_insert((w, n));
        if n > e.1 {
            *e = (w, n);
        }
    }
    let mut problems = Vec::new();
    for r in &rows {
        let w = width[r.method.as_str()].0;
        if w != r.values.len() {
            problems.push(format!(
                "{} {} {}: {} values, the method's other queries {w}",
                r.method,
                r.task,
                r.template_id,
                r.values.len()
            ));
        }
    }
    fail_with(path, problems)?;
    Ok(rows)
}

/// The gallery file: (method, key, embedding) rows, each method's width
/// its queries', every image the templates compare with present once.
fn check_gallery(
    run: &RunTemplates,
    f: &UserTable,
    queries: &[Row],
    method: Option<&str>,
) -> Result<Vec<(String, String, Vec<f32>)>> {
    let mut width: BTreeMap<&str, usize> = BTreeMap::new();
    for q in queries {
        width.insert(&q.method, q.values.len());
    }
    let keys = f.text("image_key")?;
    let vals = f.values("embedding")?;
    // Without a method column the gallery serves every method.
    let methods: Vec<Vec<String>> = match f.has("method") {
        true => f
            .text("method")?
            .into_iter()
            .map(|m| m.into_iter().collect())
            .collect(),
        false => vec![
            method.map_or_else(
                || width.keys().map(|m| m.to_string()).collect(),
                |m| vec![m.to_string()]
            );
            f.n
        ],
    };
    let mut problems = Vec::new();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut out = Vec::new();
    for i in 0..f.n {
        let (Some(key), Some(v)) = (&keys[i], &vals[i]) else {
            problems.push(format!("row {i}: no image_key or no embedding"));
            continue;
        };
        if v.iter().any(|x| !x.is_finite()) {
            problems.push(format!(
                "row {i} ({key}): a value is NaN, infinite or missing"
            ));
            continue;
        }
        if methods[i].is_empty() {
            problems.push(format!("row {i} ({key}): no method"));
        }
        for m in &methods[i] {
            match width.get(m.as_str()) {
                None => problems.push(format!(
                    "row {i} ({key}): method {m} has no queries in the file"
                )),
                Some(&w) if w != v.len() => problems.push(format!(
                    "row {i} ({m} {key}): {} values, its queries {w}",
                    v.len()
                )),
                _ => {
                    if let Some(first) = seen.insert((m.clone(), key.clone()), i) {
                        problems.push(format!("row {i} ({m} {key}): also in row {first}"));
                    } else if run.images.contains(key) {
                        out.push((m.clone(), key.clone(), v.clone()));
                    }
                }
            }
        }
    }
    for m in width.keys() {
        let missing: Vec<&String> = run
            .images
            .iter()
            .filter(|k| !seen.contains_key(&(m.to_string(), (*k).clone())))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "method {m}: {} image(s) the templates compare with have no gallery embedding, e.g. {}",
                missing.len(),
                missing.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    fail_with(&f.path, problems)?;
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(out)
}
