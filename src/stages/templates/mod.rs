//! `templates`: the GeneCIS benchmark templates (the official JSON files of
//! facebookresearch/genecis, any subset of the four tasks) and the original's
//! two global evaluations (CIRR val, MIT-States test; `global.rs`) as tables.
//! Every image is named by an *image key* (file plus crop box), so `embed`
//! encodes each distinct image once however many templates use it.
//!
//! Tables:
//! - `templates(task, template_id, condition, reference_key, target_key?,
//!   gallery_keys list<utf8>, gallery_set?, target_keys list<utf8>?)`:
//!   `template_id` is the index in the file's array (CIRR: the `pairid`).
//!   GeneCIS tasks rank `gallery_keys` with the target as candidate 0;
//!   global tasks rank the whole `gallery_set` (reference masked), a hit
//!   being any of `target_keys` (empty where labels are hidden), and
//!   `gallery_keys` holds CIRR's subset (`img_set.members` without the
//!   reference) for Recall_subset.
//! - `galleries(gallery_set, image_key)`: each global task's images, in order.
//! - `image_keys(image_key, source, path, bbox_x, bbox_y, bbox_w, bbox_h,
//!   required, rgb_first)`: distinct over all tasks; bbox only for `vg`;
//!   `rgb_first` where the original converts to RGB before its transform.
//! - `texts(text)`: the distinct conditions.
//! - `rejects(source, line_number, reason, raw)`: malformed templates
//!   (`line_number` = index in the file's array).
//!
//! Formats (per record, whatever the task): COCO style
//! `{"val_image_id": 189213}` -> `<coco_dir>/000000189213.jpg`; VAW style
//! `{"image_id": 2373917, "instance_bbox": [x, y, w, h]}` -> `<vg_dir>/2373917.jpg`,
//! cropped as in the original (ARCHITECTURE.md, "Semantics kept from the original").

pub(crate) mod global;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, ListBuilder, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::template_file::{read_template_file, ImageRef, Template, TemplateFile, TASKS};
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::tables::image_keys::{
    image_keys_batch, texts_batch, ImageKey, IMAGE_KEYS_SCHEMA, TEXTS_SCHEMA,
};
use crate::tables::rejects::{RejectRows, REJECTS_SCHEMA};

pub(crate) static TEMPLATES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("template_id", DataType::UInt32, false),
        Field::new("condition", DataType::Utf8, false),
        Field::new("reference_key", DataType::Utf8, false),
        Field::new("target_key", DataType::Utf8, true),
        Field::new("gallery_keys", utf8_list(), false),
        Field::new("gallery_set", DataType::Utf8, true),
        Field::new("target_keys", utf8_list(), true),
    ]))
});

fn utf8_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

pub(crate) static GALLERIES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("gallery_set", DataType::Utf8, false),
        Field::new("image_key", DataType::Utf8, false),
    ]))
});

/// Image counts of the official image folders, for `check`.
const COCO_VAL2017_IMAGES: usize = 5_000;
const VG_IMAGES: usize = 108_249;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TemplatesParams {
    pub focus_attribute: Option<PathBuf>,
    pub change_attribute: Option<PathBuf>,
    pub focus_object: Option<PathBuf>,
    pub change_object: Option<PathBuf>,
    /// COCO val2017 images (`{id:012d}.jpg`), for COCO-style templates.
    pub coco_dir: Option<PathBuf>,
    /// Visual Genome images, all in one folder (`{image_id}.jpg`), for
    /// VAW-style templates.
    pub vg_dir: Option<PathBuf>,
    /// CIRR (the original's cirr_root: cirr/captions, cirr/image_splits and
    /// the image folders): adds task `cirr_val`, global retrieval over the
    /// val images.
    pub cirr_dir: Option<PathBuf>,
    /// The CIRR split: `val` (task `cirr_val`: R@1/5/10/50 and
    /// Recall_subset@1/2/3) or `test1` (task `cirr_test1`: labels hidden;
    /// `score` writes the CIRR server's two submission files).
    pub cirr_split: String,
    /// MIT-States (images/<adj noun>/*.jpg): adds task `mit_states`, global
    /// retrieval over the 49 test nouns' images.
    pub mit_states_dir: Option<PathBuf>,
    /// MIT-States queries say "adj noun" instead of the adjective alone
    /// (the original's use_complete_text_query).
    pub mit_states_full_query: bool,
    /// The original keeps only templates whose gallery has the file's most
    /// common length (ties: the shortest) and drops the rest ("a hack", its
    /// code says); they go to `rejects` here. true keeps every template.
    pub keep_all_gallery_sizes: bool,
}

impl Default for TemplatesParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        TemplatesParams {
            focus_attribute: Default::default(),
            change_attribute: Default::default(),
            focus_object: Default::default(),
            change_object: Default::default(),
            coco_dir: Default::default(),
            vg_dir: Default::default(),
            cirr_dir: Default::default(),
            cirr_split: "val".into(),
            mit_states_dir: Default::default(),
            mit_states_full_query: Default::default(),
            keep_all_gallery_sizes: Default::default(),
        }
    }
}

impl TemplatesParams {
    /// (task, file) for the tasks given, in [`TASKS`] order.
    pub(crate) fn tasks(&self) -> Vec<(&'static str, &Path)> {
        let files = [
            &self.focus_attribute,
            &self.change_attribute,
            &self.focus_object,
            &self.change_object,
        ];
        TASKS
            .iter()
            .zip(files)
            .filter_map(|(t, f)| f.as_deref().map(|f| (*t, f)))
            .collect()
    }
}

/// The most common gallery length, the shortest on a tie (numpy's
/// `unique` + `argmax`, as the original picks it).
fn modal_gallery_len(ts: &[(usize, Template)]) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, t) in ts {
        *counts.entry(t.gallery.len()).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts
        .into_iter()
        .find(|&(_, c)| c == best)
        .map(|(len, _)| len)
}

pub(crate) struct Templates;

/// `p` with the files a synth stage's `sources` table gives filled in
/// where params leave them out.
fn with_sources(p: &TemplatesParams, ctx: &StageContext) -> Result<TemplatesParams> {
    let mut p = p.clone();
    let Some(d) = ctx.optional_input("sources") else {
        return Ok(p);
    };
    let get = |role: &str| crate::tables::sources::source(d, role);
    for (slot, role) in [
        (&mut p.focus_attribute, "focus_attribute"),
        (&mut p.change_attribute, "change_attribute"),
        (&mut p.focus_object, "focus_object"),
        (&mut p.change_object, "change_object"),
        (&mut p.coco_dir, "coco_dir"),
        (&mut p.vg_dir, "vg_dir"),
    ] {
        if slot.is_none() {
            *slot = get(role)?;
        }
    }
    Ok(p)
}

impl Stage for Templates {
    const KIND: &'static str = "templates";
    /// 2: CIRR's template ids are its pair ids; its subsets in
    /// `gallery_keys`; `cirr_split`.
    const VERSION: &'static str = "2";
    const ABOUT: &'static str =
        "GeneCIS template JSONs (COCO or VAW style) -> templates, image_keys, texts, rejects";
    type Params = TemplatesParams;

    /// Each GeneCIS task's template file, read, and the global tasks.
    type Work = (
        Vec<(&'static str, PathBuf, TemplateFile)>,
        Vec<global::GlobalTask>,
    );

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[InputTable::optional("sources")];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("templates", TEMPLATES_SCHEMA.clone()),
            TableDef::new("image_keys", IMAGE_KEYS_SCHEMA.clone()),
            TableDef::new("texts", TEXTS_SCHEMA.clone()),
            TableDef::new("rejects", REJECTS_SCHEMA.clone()),
            TableDef::new("galleries", GALLERIES_SCHEMA.clone()),
        ]
    }

    /// The task files and image folders must be named, unless a synth
    /// stage in inputs gives them (its `sources` table).
    fn validate_inputs(p: &TemplatesParams, tables: &[String]) -> Vec<Finding> {
        let mut out = Vec::new();
        if tables.iter().any(|t| t == "sources") {
            return out;
        }
        let tasks = p.tasks();
        if !["val", "test1"].contains(&p.cirr_split.as_str()) {
            out.push(Finding::error(
                "cirr_split",
                format!(
                    "'{}' is not a CIRR split this scores: val or test1",
                    p.cirr_split
                ),
            ));
        }
        if tasks.is_empty() && p.cirr_dir.is_none() && p.mit_states_dir.is_none() {
            out.push(Finding::error(
                "params",
                format!(
                    "name at least one task file ({}), or cirr_dir or mit_states_dir",
                    TASKS.join(", ")
                ),
            ));
        }
        let has = |suffix: &str| tasks.iter().any(|(t, _)| t.ends_with(suffix));
        if has("_object") && p.coco_dir.is_none() {
            out.push(Finding::error(
                "coco_dir",
                "the object tasks use COCO val2017 images: set coco_dir to the folder of 000000xxxxxx.jpg files",
            ));
        }
        if has("_attribute") && p.vg_dir.is_none() {
            out.push(Finding::error(
                "vg_dir",
                "the attribute tasks use Visual Genome images: set vg_dir to the one folder holding all VG images",
            ));
        }
        out
    }

    fn files(p: &TemplatesParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut v: Vec<(&'static str, PathBuf)> = p
            .tasks()
            .into_iter()
            .map(|(t, f)| (t, resolve_path(base, f)))
            .collect();
        if let Some(d) = &p.coco_dir {
            v.push(("coco_dir", resolve_path(base, d)));
        }
        if let Some(d) = &p.vg_dir {
            v.push(("vg_dir", resolve_path(base, d)));
        }
        if let Some(d) = &p.cirr_dir {
            let (cap, split) = global::cirr_files(&resolve_path(base, d), &p.cirr_split);
            v.push(("cirr_dir", cap));
            v.push(("cirr_dir", split));
        }
        if let Some(d) = &p.mit_states_dir {
            v.push(("mit_states_dir", resolve_path(base, d).join("images")));
        }
        v
    }

    fn check(p: &TemplatesParams, base: &Path) -> Vec<Finding> {
        check(p, base)
    }

    fn plan(p: &TemplatesParams, ctx: &StageContext) -> Result<Chunks<Self::Work>> {
        let p = &with_sources(p, ctx)?;
        let mut files = Vec::new();
        let mut n = 0u64;
        for (task, file) in p.tasks() {
            let path = ctx.resolve(file);
            let tf = read_template_file(&path).map_err(|m| Error::BadInputFile {
                what: "template file",
                path: path.clone(),
                message: format!("task {task}: {m}"),
                advice: "Give the official GeneCIS JSON for this task (genecis/README.md says where it comes from); `genecis check MANIFEST` validates all four",
            })?;
            n += (tf.ok.len() + tf.bad.len()) as u64;
            files.push((task, path, tf));
        }
        let mut globals = Vec::new();
        if let Some(d) = &p.cirr_dir {
            globals.push(global::read_cirr(&ctx.resolve(d), &p.cirr_split)?);
        }
        if let Some(d) = &p.mit_states_dir {
            globals.push(global::read_mit_states(
                &ctx.resolve(d),
                p.mit_states_full_query,
            )?);
        }
        n += globals
            .iter()
            .map(|g| (g.queries.len() + g.rejects.len()) as u64)
            .sum::<u64>();
        Ok(Chunks::single((files, globals), n, "templates"))
    }

    fn run_shared(
        p: &TemplatesParams,
        (files, globals): &Self::Work,
        _k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let p = &with_sources(p, ctx)?;
        let coco = p.coco_dir.as_ref().map(|d| ctx.resolve(d));
        let vg = p.vg_dir.as_ref().map(|d| ctx.resolve(d));
        let mut rows = TemplateRows::default();
        let mut rejects = RejectRows::default();
        let mut keys: BTreeMap<String, ImageKey> = BTreeMap::new();
        let mut texts: BTreeSet<String> = BTreeSet::new();
        for (task, path, tf) in files {
            let source = path.display().to_string();
            let mut bad = tf.bad.clone();
            let mut n_ok = 0usize;
            let modal = modal_gallery_len(&tf.ok);
            for (i, t) in &tf.ok {
                if !p.keep_all_gallery_sizes && Some(t.gallery.len()) != modal {
                    bad.push((
                        *i,
                        format!(
                            "gallery of {} images; the file's usual size is {} and the original evaluates only those (keep_all_gallery_sizes = true keeps it)",
                            t.gallery.len(),
                            modal.unwrap_or(0)
                        ),
                        String::new(),
                    ));
                    continue;
                }
                let resolved: Result<Vec<PathBuf>, String> = t
                    .images()
                    .map(|im| im.path(coco.as_deref(), vg.as_deref()))
                    .collect();
                let paths = match resolved {
                    Ok(p) => p,
                    Err(reason) => {
                        bad.push((*i, reason, String::new()));
                        continue;
                    }
                };
                for (im, path) in t.images().zip(paths) {
                    keys.entry(im.key()).or_insert(ImageKey {
                        source: im.source(),
                        path,
                        bbox: match im {
                            ImageRef::Vaw { bbox, .. } => Some(*bbox),
                            ImageRef::Coco(_) => None,
                        },
                        rgb_first: false,
                    });
                }
                texts.insert(t.condition.clone());
                rows.genecis(task, *i as u32, t);
                n_ok += 1;
            }
            bad.sort_by_key(|b| b.0);
            for (i, reason, raw) in &bad {
                rejects.push(&source, Some(*i as i64), reason, raw);
            }
            ctx.note(format!(
                "{task}: {n_ok} templates{}",
                rejected_note(bad.len())
            ));
        }
        let mut g_set = StringBuilder::new();
        let mut g_key = StringBuilder::new();
        for g in globals {
            for (key, path) in &g.gallery {
                keys.entry(key.clone()).or_insert(ImageKey {
                    source: g.source,
                    path: path.clone(),
                    bbox: None,
                    rgb_first: g.rgb_first,
                });
                g_set.append_value(g.task);
                g_key.append_value(key);
            }
            for q in &g.queries {
                texts.insert(q.condition.clone());
                rows.global(g, q);
            }
            let source = g.source_file.display().to_string();
            for (i, reason, raw) in &g.rejects {
                rejects.push(&source, Some(*i as i64), reason, raw);
            }
            ctx.note(format!(
                "{}: {} queries over {} images{}",
                g.task,
                g.queries.len(),
                g.gallery.len(),
                rejected_note(g.rejects.len())
            ));
        }
        let galleries = RecordBatch::try_new(
            GALLERIES_SCHEMA.clone(),
            vec![
                Arc::new(g_set.finish()) as ArrayRef,
                Arc::new(g_key.finish()),
            ],
        )?;
        ctx.note(format!(
            "{} distinct images, {} distinct conditions",
            keys.len(),
            texts.len()
        ));
        let (templates, image_keys) = (rows.finish()?, image_keys_batch(&keys)?);
        let (texts_b, rejects) = (texts_batch(&texts)?, rejects.finish()?);
        Ok(Some(vec![
            ("templates", templates),
            ("image_keys", image_keys),
            ("texts", texts_b),
            ("rejects", rejects),
            ("galleries", galleries),
        ]))
    }
}

/// What `image_keys` records of one image.
/// ", n rejected (see the rejects table)" when there are any.
fn rejected_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} rejected (see the rejects table)")
    }
}

/// Builders of the `templates` table.
#[derive(Default)]
struct TemplateRows {
    task: StringBuilder,
    id: UInt32Builder,
    condition: StringBuilder,
    reference: StringBuilder,
    target: StringBuilder,
    gallery: ListBuilder<StringBuilder>,
    gallery_set: StringBuilder,
    targets: ListBuilder<StringBuilder>,
}

impl TemplateRows {
    /// A GeneCIS template: its own gallery, the target as candidate 0.
    fn genecis(&mut self, task: &str, id: u32, t: &Template) {
        self.task.append_value(task);
        self.id.append_value(id);
        self.condition.append_value(&t.condition);
        self.reference.append_value(t.reference.key());
        self.target.append_value(t.target.key());
        for g in &t.gallery {
            self.gallery.values().append_value(g.key());
        }
        self.gallery.append(true);
        self.gallery_set.append_null();
        self.targets.append_null();
    }

    /// A global task's query: the whole gallery set, hits by key.
    fn global(&mut self, g: &global::GlobalTask, q: &global::GlobalQuery) {
        self.task.append_value(g.task);
        self.id.append_value(q.id);
        self.condition.append_value(&q.condition);
        self.reference.append_value(&g.gallery[q.reference].0);
        self.target
            .append_option(q.target.map(|t| g.gallery[t].0.as_str()));
        for &m in &q.subset {
            self.gallery.values().append_value(&g.gallery[m].0);
        }
        self.gallery.append(true);
        self.gallery_set.append_value(g.task);
        for &r in &q.relevant {
            self.targets.values().append_value(&g.gallery[r].0);
        }
        self.targets.append(true);
    }

    fn finish(mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            TEMPLATES_SCHEMA.clone(),
            vec![
                Arc::new(self.task.finish()) as ArrayRef,
                Arc::new(self.id.finish()),
                Arc::new(self.condition.finish()),
                Arc::new(self.reference.finish()),
                Arc::new(self.target.finish()),
                Arc::new(self.gallery.finish()),
                Arc::new(self.gallery_set.finish()),
                Arc::new(self.targets.finish()),
            ],
        )?)
    }
}

fn count_jpgs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .to_ascii_lowercase()
                        .ends_with(".jpg")
                })
                .count()
        })
        .unwrap_or(0)
}

fn thousands(n: usize) -> String {
    crate::framework::progress::thousands(n as u64)
}

/// What `genecis check` verifies for the benchmark data: each file parses
/// with the expected schema, the image folders look like the official ones,
/// and every image a template names exists.
fn check(p: &TemplatesParams, base: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let coco = p.coco_dir.as_ref().map(|d| resolve_path(base, d));
    let vg = p.vg_dir.as_ref().map(|d| resolve_path(base, d));
    let folder = |field: &str, dir: &Path, expected: usize, what: &str, out: &mut Vec<Finding>| {
        if !dir.is_dir() {
            out.push(Finding::error(
                field,
                format!("{} is not a folder", dir.display()),
            ));
            return;
        }
        let n = count_jpgs(dir);
        if n != expected {
            out.push(Finding::warning(
                field,
                format!(
                    "{} holds {} .jpg images; {what} has {}. A subset is fine as long as every template image is there (checked below)",
                    dir.display(),
                    thousands(n),
                    thousands(expected)
                ),
            ));
        }
    };
    if let Some(d) = &coco {
        folder("coco_dir", d, COCO_VAL2017_IMAGES, "COCO val2017", &mut out);
        if count_jpgs(d) == 0 && d.join("val2017").is_dir() {
            out.push(Finding::error(
                "coco_dir",
                format!(
                    "{} holds no images but has a val2017 folder: set coco_dir = \"{}\"",
                    d.display(),
                    d.join("val2017").display()
                ),
            ));
        }
    }
    if let Some(d) = &vg {
        folder("vg_dir", d, VG_IMAGES, "Visual Genome 1.2", &mut out);
        let parts: Vec<&str> = ["VG_100K", "VG_100K_2"]
            .into_iter()
            .filter(|s| d.join(s).is_dir())
            .collect();
        if !parts.is_empty() {
            out.push(Finding::error(
                "vg_dir",
                format!(
                    "{} has the {} folder(s) Visual Genome ships; GeneCIS needs all images in one folder. Fix: mkdir {all} && ln {d}/VG_100K/*.jpg {d}/VG_100K_2/*.jpg {all}/ (or mv), then set vg_dir = \"{all}\"",
                    d.display(),
                    parts.join(" and "),
                    d = d.display(),
                    all = d.join("images").display()
                ),
            ));
        }
    }
    if let Some(d) = &p.cirr_dir {
        out.extend(global::check_cirr(&resolve_path(base, d), &p.cirr_split));
    }
    if let Some(d) = &p.mit_states_dir {
        out.extend(global::check_mit_states(&resolve_path(base, d)));
    }
    let mut missing: Vec<(String, usize, PathBuf)> = Vec::new();
    let mut n_missing = 0usize;
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    for (task, file) in p.tasks() {
        let path = resolve_path(base, file);
        let tf = match read_template_file(&path) {
            Ok(tf) => tf,
            Err(m) => {
                out.push(Finding::error(task, m));
                continue;
            }
        };
        if !tf.bad.is_empty() {
            let first: Vec<String> = tf
                .bad
                .iter()
                .take(3)
                .map(|(i, r, _)| format!("#{i}: {r}"))
                .collect();
            out.push(Finding::error(
                task,
                format!(
                    "{} of {} templates in {} are malformed ({}); they would be rejected",
                    tf.bad.len(),
                    tf.bad.len() + tf.ok.len(),
                    path.display(),
                    first.join("; ")
                ),
            ));
        }
        // The official files: object tasks are COCO style, attribute tasks VAW style.
        let want_coco = task.ends_with("_object");
        if let Some((i, t)) = tf
            .ok
            .iter()
            .find(|(_, t)| matches!(t.reference, ImageRef::Coco(_)) != want_coco)
        {
            out.push(Finding::warning(
                task,
                format!(
                    "template #{i} of {} is {} style, but the official {task} templates are {} style: are the files swapped?",
                    path.display(),
                    if want_coco { "VAW" } else { "COCO" },
                    if want_coco { "COCO" } else { "VAW" },
                    i = i,
                    task = task
                ),
            ));
            let _ = t;
        }
        let mut unresolved = BTreeSet::new();
        for (i, t) in &tf.ok {
            for im in t.images() {
                match im.path(coco.as_deref(), vg.as_deref()) {
                    Ok(p) => {
                        if seen.insert(p.clone()) && !p.is_file() {
                            n_missing += 1;
                            if missing.len() < 5 {
                                missing.push((task.to_string(), *i, p));
                            }
                        }
                    }
                    Err(m) => {
                        unresolved.insert(m);
                    }
                }
            }
        }
        for m in unresolved {
            out.push(Finding::error(task, format!("templates name {m}")));
        }
    }
    if n_missing > 0 {
        let list: Vec<String> = missing
            .iter()
            .map(|(t, i, p)| format!("{} ({t} #{i})", p.display()))
            .collect();
        out.push(Finding::error(
            if coco.is_some() && vg.is_none() {
                "coco_dir"
            } else if vg.is_some() && coco.is_none() {
                "vg_dir"
            } else {
                "images"
            },
            format!(
                "{} template image(s) do not exist, e.g. {}",
                thousands(n_missing),
                list.join(", ")
            ),
        ));
    }
    out
}
