//! The GeneCIS template files (facebookresearch/genecis's four JSON files):
//! their tasks, records and image references, read once for the
//! `templates` stage and for `genecis audit`.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The four GeneCIS tasks, in the paper's order.
pub(crate) const TASKS: [&str; 4] = [
    "focus_attribute",
    "change_attribute",
    "focus_object",
    "change_object",
];

/// One image of a template, as the JSON names it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ImageRef {
    Coco(u64),
    Vaw { image_id: String, bbox: [f64; 4] },
}

impl ImageRef {
    pub(crate) fn key(&self) -> String {
        match self {
            ImageRef::Coco(id) => format!("coco/{id:012}.jpg"),
            ImageRef::Vaw { image_id, bbox } => format!(
                "vg/{image_id}.jpg#{},{},{},{}",
                bbox[0], bbox[1], bbox[2], bbox[3]
            ),
        }
    }

    pub(crate) fn source(&self) -> &'static str {
        match self {
            ImageRef::Coco(_) => "coco",
            ImageRef::Vaw { .. } => "vg",
        }
    }

    /// The file, or the param that must be set to find it.
    pub(crate) fn path(&self, coco: Option<&Path>, vg: Option<&Path>) -> Result<PathBuf, String> {
        match self {
            ImageRef::Coco(id) => coco
                .map(|d| d.join(format!("{id:012}.jpg")))
                .ok_or_else(|| {
                    "a COCO-style image (val_image_id) but params.coco_dir is not set".into()
                }),
            ImageRef::Vaw { image_id, .. } => vg
                .map(|d| d.join(format!("{image_id}.jpg")))
                .ok_or_else(|| {
                    "a VAW-style image (image_id + instance_bbox) but params.vg_dir is not set"
                        .into()
                }),
        }
    }

    fn parse(v: &Value) -> Result<ImageRef, String> {
        let obj = v.as_object().ok_or("an image entry is not an object")?;
        if let Some(id) = obj.get("val_image_id") {
            let id = id
                .as_u64()
                .or_else(|| id.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| format!("val_image_id {id} is not a non-negative integer"))?;
            return Ok(ImageRef::Coco(id));
        }
        if let Some(id) = obj.get("image_id") {
            let image_id = match id {
                Value::Number(n) if n.is_u64() => n.to_string(),
                Value::String(s)
                    if !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    s.clone()
                }
                other => return Err(format!("image_id {other} is not an id")),
            };
            let bbox = obj
                .get("instance_bbox")
                .ok_or("a VAW-style image (image_id) without instance_bbox")?;
            let nums: Vec<f64> = bbox
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            if nums.len() != 4 || bbox.as_array().map(Vec::len) != Some(4) {
                return Err(format!("instance_bbox {bbox} is not [x, y, w, h]"));
            }
            if nums[2] <= 0.0 || nums[3] <= 0.0 || nums.iter().any(|x| !x.is_finite()) {
                return Err(format!("instance_bbox {bbox} has no area"));
            }
            return Ok(ImageRef::Vaw {
                image_id,
                bbox: [nums[0], nums[1], nums[2], nums[3]],
            });
        }
        Err("an image entry has neither val_image_id (COCO style) nor image_id + instance_bbox (VAW style)".into())
    }
}

/// One parsed template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub condition: String,
    pub reference: ImageRef,
    pub target: ImageRef,
    pub gallery: Vec<ImageRef>,
}

impl Template {
    fn parse(v: &Value) -> Result<Template, String> {
        let obj = v.as_object().ok_or("a template is not an object")?;
        let condition = obj
            .get("condition")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or("no condition (a non-empty string)")?
            .to_string();
        let field = |name: &str| -> Result<ImageRef, String> {
            ImageRef::parse(obj.get(name).ok_or_else(|| format!("no {name}"))?)
                .map_err(|e| format!("{name}: {e}"))
        };
        let reference = field("reference")?;
        let target = field("target")?;
        let gallery = obj
            .get("gallery")
            .and_then(Value::as_array)
            .ok_or("no gallery (an array of images)")?
            .iter()
            .enumerate()
            .map(|(i, g)| ImageRef::parse(g).map_err(|e| format!("gallery[{i}]: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        if gallery.is_empty() {
            return Err("the gallery is empty".into());
        }
        Ok(Template {
            condition,
            reference,
            target,
            gallery,
        })
    }

    pub(crate) fn images(&self) -> impl Iterator<Item = &ImageRef> {
        std::iter::once(&self.reference)
            .chain(std::iter::once(&self.target))
            .chain(self.gallery.iter())
    }
}

/// A template file: the parsed templates by index, and the malformed ones.
pub(crate) struct TemplateFile {
    pub ok: Vec<(usize, Template)>,
    pub bad: Vec<(usize, String, String)>,
}

/// Reads one template file. A file that is not a JSON array of templates
/// is an error; a malformed template is a reject.
pub(crate) fn read_template_file(path: &Path) -> Result<TemplateFile, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.starts_with(b"\xEF\xBB\xBF") {
        // The original's json.load refuses it too ("Unexpected UTF-8 BOM").
        return Err(format!(
            "{} starts with a UTF-8 byte-order mark, which JSON (and the original's json.load) does not allow: save it as UTF-8 without BOM",
            path.display()
        ));
    }
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let arr = v.as_array().ok_or_else(|| {
        format!(
            "{} is not a GeneCIS template file: expected a JSON array of templates",
            path.display()
        )
    })?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (i, t) in arr.iter().enumerate() {
        match Template::parse(t) {
            Ok(t) => ok.push((i, t)),
            Err(reason) => {
                let mut raw = t.to_string();
                if raw.len() > 2000 {
                    let mut cut = 2000;
                    while !raw.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    raw.truncate(cut);
                }
                bad.push((i, reason, raw))
            }
        }
    }
    Ok(TemplateFile { ok, bad })
}
