//! The two global-retrieval evaluations of the original's `evaluate.py`:
//! CIRR val (datasets/cirr_datasets.py) and MIT-States test
//! (datasets/mit_states_dataset.py). Each query ranks the whole image set
//! with the reference masked out; `score` gives Recall@1/5/10.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::framework::stage::Finding;

/// MIT-States' test nouns, the original's fixed list of 49.
pub(crate) const MIT_STATES_TEST_NOUNS: [&str; 49] = [
    "armor",
    "bracelet",
    "bush",
    "camera",
    "candy",
    "castle",
    "ceramic",
    "cheese",
    "clock",
    "clothes",
    "coffee",
    "fan",
    "fig",
    "fish",
    "foam",
    "forest",
    "fruit",
    "furniture",
    "garden",
    "gate",
    "glass",
    "horse",
    "island",
    "laptop",
    "lead",
    "lightning",
    "mirror",
    "orange",
    "paint",
    "persimmon",
    "plastic",
    "plate",
    "potato",
    "road",
    "rubber",
    "sand",
    "shell",
    "sky",
    "smoke",
    "steel",
    "stream",
    "table",
    "tea",
    "tomato",
    "vacuum",
    "wax",
    "wheel",
    "window",
    "wool",
];

/// A global task: a gallery of images and queries into it.
pub(crate) struct GlobalTask {
    /// `cirr_val` or `mit_states`: the task and the gallery set name.
    pub task: &'static str,
    /// The `image_keys.source` of its images.
    pub source: &'static str,
    /// The file rejects point at.
    pub source_file: PathBuf,
    /// (image key, file), in gallery order.
    pub gallery: Vec<(String, PathBuf)>,
    pub queries: Vec<GlobalQuery>,
    /// (index, reason, raw) of entries that cannot be queries.
    pub rejects: Vec<(usize, String, String)>,
    /// The original converts these images to RGB before its transform.
    pub rgb_first: bool,
}

pub(crate) struct GlobalQuery {
    /// The template id: the entry's index in the source.
    pub id: u32,
    pub condition: String,
    /// Gallery positions.
    pub reference: usize,
    /// The single target, where there is one (CIRR's `target_hard`).
    pub target: Option<usize>,
    /// Every image that counts as a hit (none where labels are hidden:
    /// CIRR test1).
    pub relevant: Vec<usize>,
    /// CIRR's `img_set.members` without the reference, in file order: the
    /// candidates of Recall_subset; empty elsewhere.
    pub subset: Vec<usize>,
}

fn bad(what: &'static str, path: &Path, message: String, advice: &'static str) -> Error {
    Error::BadInputFile {
        what,
        path: path.to_path_buf(),
        message,
        advice,
    }
}

const CIRR_ADVICE: &str = "cirr_dir is the folder that holds cirr/captions/cap.rc2.<split>.json, cirr/image_splits/split.rc2.<split>.json and the image folders those splits name (the original's cirr_root)";

/// The caption and split files of a CIRR split under `root`.
pub(crate) fn cirr_files(root: &Path, split: &str) -> (PathBuf, PathBuf) {
    (
        root.join("cirr/captions")
            .join(format!("cap.rc2.{split}.json")),
        root.join("cirr/image_splits")
            .join(format!("split.rc2.{split}.json")),
    )
}

/// `str.strip('./')`: the original strips dots and slashes at both ends of
/// a split's relative path.
fn strip_dots_and_slashes(s: &str) -> &str {
    s.trim_matches(|c| c == '.' || c == '/')
}

/// CIRR `split` (`val` or `test1`) as CIRRValGlobalDataset reads it: the
/// gallery is every image of the split (name order), each caption a query
/// from `reference` to `target_hard` (none in test1, whose labels are
/// hidden), its template id the caption's `pairid` (the key the CIRR
/// server expects), its subset `img_set.members` without the reference.
pub(crate) fn read_cirr(root: &Path, split: &str) -> Result<GlobalTask> {
    let (cap_path, split_path) = cirr_files(root, split);
    let read_json = |p: &Path| -> Result<Value> {
        let text = std::fs::read(p).map_err(Error::io("cannot read", p))?;
        serde_json::from_slice(&text)
            .map_err(|e| bad("CIRR file", p, format!("not JSON: {e}"), CIRR_ADVICE))
    };
    let names = read_json(&split_path)?;
    let names = names.as_object().ok_or_else(|| {
        bad(
            "CIRR split file",
            &split_path,
            "expected an object of image name -> relative path".into(),
            CIRR_ADVICE,
        )
    })?;
    let mut gallery = Vec::with_capacity(names.len());
    let mut position: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, rel) in names {
        let rel = rel.as_str().ok_or_else(|| {
            bad(
                "CIRR split file",
                &split_path,
                format!("the path of '{name}' is not a string"),
                CIRR_ADVICE,
            )
        })?;
        let rel = strip_dots_and_slashes(rel);
        position.insert(name.as_str(), gallery.len());
        gallery.push((format!("cirr/{rel}"), root.join(rel)));
    }
    let caps = read_json(&cap_path)?;
    let caps = caps.as_array().ok_or_else(|| {
        bad(
            "CIRR caption file",
            &cap_path,
            "expected an array of {pairid, reference, target_hard, caption, img_set, ...}".into(),
            CIRR_ADVICE,
        )
    })?;
    let hidden = split.starts_with("test");
    let mut queries = Vec::new();
    let mut rejects = Vec::new();
    let mut ids = BTreeMap::new();
    for (i, c) in caps.iter().enumerate() {
        let field = |k: &str| c.get(k).and_then(Value::as_str);
        let image = |name: &str, what: &str| {
            position.get(name).copied().ok_or(format!(
                "{what} '{name}' is not an image of the {split} split"
            ))
        };
        let parsed = (|| -> std::result::Result<GlobalQuery, String> {
            let id = c
                .get("pairid")
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
                .ok_or("needs an integer pairid")?;
            if let Some(first) = ids.insert(id, i) {
                return Err(format!("pairid {id} is also entry {first}'s"));
            }
            let (Some(r), Some(cap)) = (field("reference"), field("caption")) else {
                return Err("needs string fields reference and caption".into());
            };
            let reference = image(r, "reference")?;
            let target = match (hidden, field("target_hard")) {
                (true, _) => None,
                (false, Some(t)) => Some(image(t, "target_hard")?),
                (false, None) => return Err("needs a string target_hard".into()),
            };
            let members = c
                .get("img_set")
                .and_then(|s| s.get("members"))
                .and_then(Value::as_array)
                .ok_or("needs img_set.members")?;
            let mut subset = Vec::new();
            for m in members {
                let m = image(
                    m.as_str().ok_or("img_set.members holds a non-string")?,
                    "member",
                )?;
                if m != reference {
                    subset.push(m);
                }
            }
            if let Some(t) = target {
                if !subset.contains(&t) {
                    return Err("target_hard is not among img_set.members".into());
                }
            }
            Ok(GlobalQuery {
                id,
                condition: cap.to_string(),
                reference,
                target,
                relevant: target.into_iter().collect(),
                subset,
            })
        })();
        match parsed {
            Ok(q) => queries.push(q),
            Err(reason) => rejects.push((i, reason, c.to_string())),
        }
    }
    Ok(GlobalTask {
        task: if hidden { "cirr_test1" } else { "cirr_val" },
        source: "cirr",
        source_file: cap_path,
        gallery,
        queries,
        rejects,
        rgb_first: false,
    })
}

const MIT_ADVICE: &str =
    "mit_states_dir is the MIT-States release folder: images/<adjective noun>/*.jpg (the original's mit_states_root)";

/// MIT-States test as MITStatesGlobalTestSet builds it: the images of the
/// 49 test nouns (folders "adj noun", "adj ..." ones left out); for each
/// image and each other adjective seen with its noun, a query whose
/// condition is that adjective (or "adj noun" with `full_query`) and whose
/// hits are all images of the target "adj noun". Folders and files are
/// sorted (the original takes `listdir` order, which only ties can tell).
pub(crate) fn read_mit_states(root: &Path, full_query: bool) -> Result<GlobalTask> {
    let images = root.join("images");
    let mut folders: Vec<String> = std::fs::read_dir(&images)
        .map_err(Error::io(
            "cannot list the MIT-States images folder",
            &images,
        ))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    // (key, path, adj, noun), in gallery order.
    let mut imgs: Vec<(String, PathBuf, String, String)> = Vec::new();
    let mut rejects = Vec::new();
    for f in &folders {
        if !f.contains(' ') {
            continue;
        }
        let words: Vec<&str> = f.split_whitespace().collect();
        let [adj, noun] = words[..] else {
            rejects.push((
                imgs.len(),
                format!("folder '{f}' is not \"adjective noun\" (the original fails on it)"),
                f.clone(),
            ));
            continue;
        };
        if adj == "adj" || !MIT_STATES_TEST_NOUNS.contains(&noun) {
            continue;
        }
        let dir = images.join(f);
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .map_err(Error::io("cannot list", &dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        for file in files {
            if !file.ends_with("jpg") {
                rejects.push((
                    imgs.len(),
                    format!("'{f}/{file}' is not a .jpg (the original asserts every file is)"),
                    file.clone(),
                ));
                continue;
            }
            imgs.push((
                format!("mit_states/{f}/{file}"),
                dir.join(&file),
                adj.to_string(),
                noun.to_string(),
            ));
        }
    }
    // Adjectives per noun in order of first appearance; images per caption.
    let mut noun_adjs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut by_caption: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, (_, _, adj, noun)) in imgs.iter().enumerate() {
        let adjs = noun_adjs.entry(noun).or_default();
        if !adjs.contains(&adj.as_str()) {
            adjs.push(adj);
        }
        by_caption.entry((adj, noun)).or_default().push(i);
    }
    let mut queries = Vec::new();
    for (i, (_, _, adj, noun)) in imgs.iter().enumerate() {
        for &target_adj in &noun_adjs[noun.as_str()] {
            if target_adj == adj {
                continue;
            }
            queries.push(GlobalQuery {
                id: queries.len() as u32,
                subset: Vec::new(),
                condition: if full_query {
                    format!("{target_adj} {noun}")
                } else {
                    target_adj.to_string()
                },
                reference: i,
                target: None,
                relevant: by_caption[&(target_adj, noun.as_str())].clone(),
            });
        }
    }
    Ok(GlobalTask {
        task: "mit_states",
        source: "mit_states",
        source_file: images,
        gallery: imgs.into_iter().map(|(k, p, _, _)| (k, p)).collect(),
        queries,
        rejects,
        rgb_first: true,
    })
}

/// `genecis check` for a CIRR root: both files parse, and every image of
/// the split exists.
pub(crate) fn check_cirr(root: &Path, split_name: &str) -> Vec<Finding> {
    let (cap, split) = cirr_files(root, split_name);
    for f in [&cap, &split] {
        if !f.is_file() {
            return vec![Finding::error(
                "cirr_dir",
                format!("{} does not exist; {CIRR_ADVICE}", f.display()),
            )];
        }
    }
    match read_cirr(root, split_name) {
        Err(e) => vec![Finding::error("cirr_dir", crate::error::report(&e))],
        Ok(t) => {
            let mut out = missing_images("cirr_dir", &t);
            if !t.rejects.is_empty() {
                out.push(Finding::error(
                    "cirr_dir",
                    format!(
                        "{} of {} captions cannot be queries, e.g. #{}: {}",
                        t.rejects.len(),
                        t.rejects.len() + t.queries.len(),
                        t.rejects[0].0,
                        t.rejects[0].1
                    ),
                ));
            }
            out
        }
    }
}

/// `genecis check` for an MIT-States root.
pub(crate) fn check_mit_states(root: &Path) -> Vec<Finding> {
    if !root.join("images").is_dir() {
        return vec![Finding::error(
            "mit_states_dir",
            format!("{} has no images folder; {MIT_ADVICE}", root.display()),
        )];
    }
    match read_mit_states(root, false) {
        Err(e) => vec![Finding::error("mit_states_dir", crate::error::report(&e))],
        Ok(t) if t.gallery.is_empty() => vec![Finding::error(
            "mit_states_dir",
            format!(
                "{} has no images of the 49 test nouns; {MIT_ADVICE}",
                root.join("images").display()
            ),
        )],
        Ok(t) => {
            let mut out = Vec::new();
            if let Some((_, reason, _)) = t.rejects.first() {
                out.push(Finding::warning(
                    "mit_states_dir",
                    format!("{} entries left out, e.g. {reason}", t.rejects.len()),
                ));
            }
            out
        }
    }
}

fn missing_images(field: &str, t: &GlobalTask) -> Vec<Finding> {
    let missing: Vec<&PathBuf> = t
        .gallery
        .iter()
        .map(|(_, p)| p)
        .filter(|p| !p.is_file())
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    let first: Vec<String> = missing
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    vec![Finding::error(
        field,
        format!(
            "{} of the {} {} images do not exist, e.g. {}",
            missing.len(),
            t.gallery.len(),
            t.task,
            first.join(", ")
        ),
    )]
}
