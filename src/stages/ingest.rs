//! `ingest`: caption files (CC3M TSV, JSONL, an image folder with a captions
//! file) into the `captions` table; every line that cannot be used goes to
//! `rejects` with the reason, never dropped silently.
//!
//! Tables:
//! - `captions(image_id Int64, caption Utf8, image_path Utf8?, url Utf8?)`
//! - `rejects(source Utf8, line_number Int64?, reason Utf8, raw Utf8?)`
//!
//! The file is cut into chunks of `chunk_rows` physical lines; chunk `k` is
//! part `k` of both tables, so an interrupted run resumes chunk by chunk and
//! `--shard i/N` takes the chunks `k % N == i`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, StringBuilder};
use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::tables::captions::CAPTIONS_SCHEMA;
use crate::tables::rejects::{RejectRows, REJECTS_SCHEMA};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Format {
    /// `caption<TAB>url`, no header (Google's Train_GCC-training.tsv).
    Cc3mTsv,
    /// One `{"image_id", "caption", "image_path" | "url"}` object per line.
    Jsonl,
    /// `path` is a folder of images; `captions_file` has `file<TAB>caption`.
    ImageFolder,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct IngestParams {
    /// The captions file (or image folder). Not needed when a `synth` stage
    /// in inputs gives its files (its `sources` table).
    pub path: Option<PathBuf>,
    /// Inferred from `path` when absent: .tsv, .jsonl, or a folder.
    pub format: Option<Format>,
    /// Folder the images live in; `image_path` is resolved against it.
    pub images_dir: Option<PathBuf>,
    /// File name of image `{id}` for CC3M TSV (`{id}` or zero-padded `{id:09}`).
    pub image_name: String,
    /// For `image-folder`: the captions file (default `<path>/captions.tsv`).
    pub captions_file: Option<PathBuf>,
    pub max_line_bytes: usize,
    pub chunk_rows: usize,
}

impl Default for IngestParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        IngestParams {
            path: Default::default(),
            format: Default::default(),
            images_dir: Default::default(),
            image_name: "{id}".into(),
            captions_file: Default::default(),
            max_line_bytes: 64 * 1024,
            chunk_rows: 100_000,
        }
    }
}

impl IngestParams {
    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    fn format(&self) -> Option<Format> {
        self.format.or_else(|| {
            let ext = self
                .path()
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            match ext.as_str() {
                "tsv" => Some(Format::Cc3mTsv),
                "jsonl" | "ndjson" => Some(Format::Jsonl),
                "" => Some(Format::ImageFolder),
                _ => None,
            }
        })
    }

    fn captions_path(&self, base: &Path) -> PathBuf {
        let p = crate::framework::stage::resolve_path(base, self.path());
        match self.format() {
            Some(Format::ImageFolder) => match &self.captions_file {
                Some(c) => crate::framework::stage::resolve_path(base, c),
                None => p.join("captions.tsv"),
            },
            _ => p,
        }
    }
}

pub(crate) struct Ingest;

impl Stage for Ingest {
    const KIND: &'static str = "ingest";
    const VERSION: &'static str = "1";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "caption files (CC3M TSV, JSONL, image folder) -> captions, rejects";
    type Params = IngestParams;

    type Work = Lines;

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[InputTable::optional("sources")];
        INPUTS
    }

    fn validate_inputs(p: &IngestParams, tables: &[String]) -> Vec<Finding> {
        if p.path.is_none() && !tables.iter().any(|t| t == "sources") {
            return vec![Finding::error(
                "path",
                "set params.path to the captions file, or list a synth stage in inputs",
            )];
        }
        Vec::new()
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("captions", CAPTIONS_SCHEMA.clone()),
            TableDef::new("rejects", REJECTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &IngestParams, base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if p.format().is_none() {
            out.push(Finding::error(
                "format",
                "cannot tell the format from the file name; set format = \"cc3m-tsv\", \"jsonl\" or \"image-folder\"",
            ));
        }
        if !(1..=10_000_000).contains(&p.chunk_rows) {
            out.push(Finding::error("chunk_rows", "use 1 to 10,000,000"));
        }
        if !(16..=1 << 30).contains(&p.max_line_bytes) {
            out.push(Finding::error("max_line_bytes", "use 16 to 1 GiB"));
        }
        if let Err(m) = ImageName::parse(&p.image_name) {
            out.push(Finding::error("image_name", m));
        }
        if let Some(d) = &p.images_dir {
            let d = crate::framework::stage::resolve_path(base, d);
            if !d.is_dir() {
                out.push(Finding::error(
                    "images_dir",
                    format!("{} is not a folder", d.display()),
                ));
            }
        }
        if p.path.is_some()
            && p.format() == Some(Format::ImageFolder)
            && !crate::framework::stage::resolve_path(base, p.path()).is_dir()
        {
            out.push(Finding::error(
                "path",
                "format image-folder needs path to be a folder of images",
            ));
        }
        out
    }

    fn files(p: &IngestParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        if p.path.is_none() {
            return Vec::new();
        }
        let mut v = vec![(
            "path",
            crate::framework::stage::resolve_path(base, p.path()),
        )];
        if p.format() == Some(Format::ImageFolder) {
            v.push(("captions_file", p.captions_path(base)));
        }
        v
    }

    fn plan(p: &IngestParams, ctx: &StageContext) -> Result<Chunks<Lines>> {
        let format = p
            .format()
            .ok_or_else(|| Error::Internal("ingest format unknown after validation".into()))?;
        // Without params.path the files come from a synth stage's sources.
        let sources = ctx.optional_input("sources");
        let from = |role: &str| -> Result<PathBuf> {
            let d =
                sources.ok_or_else(|| Error::Internal("ingest without path or sources".into()))?;
            crate::tables::sources::source(d, role)?.ok_or_else(|| {
                Error::Data(format!(
                    "the sources table of {} has no '{role}'",
                    d.display()
                ))
            })
        };
        let source = match &p.path {
            Some(_) => p.captions_path(ctx.base_dir),
            None => from("captions")?,
        };
        let bytes = std::fs::read(&source).map_err(Error::io("cannot read", &source))?;
        let lines = split_lines(&bytes);
        let images_dir = match (&p.images_dir, &p.path) {
            (Some(d), _) => Some(ctx.resolve(d)),
            (None, None) => Some(from("images_dir")?),
            (None, Some(_)) => None,
        };
        let folder = ctx.resolve(p.path());

        // Every line's outcome; the cross-line checks (duplicates) need them all.
        let mut outcomes: Vec<Outcome> = lines
            .par_iter()
            .enumerate()
            .map(|(i, line)| match format {
                Format::Cc3mTsv => parse_tsv(i, line, p, images_dir.as_deref()),
                Format::Jsonl => parse_jsonl(
                    line,
                    p,
                    images_dir.as_deref(),
                    source.parent().unwrap_or(Path::new(".")),
                ),
                Format::ImageFolder => parse_folder_line(line, p, &folder),
            })
            .collect();
        mark_duplicates(&mut outcomes, format);
        let mut orphans = Vec::new();
        if format == Format::ImageFolder {
            orphans = uncaptioned_images(&folder, &source, &outcomes)?;
        }

        let tabs = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Row(r) if r.had_tab))
            .count();
        let rejects = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Reject(_)))
            .count()
            + orphans.len();
        if rejects > 0 {
            ctx.note(format!(
                "{rejects} line(s) rejected: see table rejects for line numbers and reasons"
            ));
        }
        if tabs > 0 {
            ctx.note(format!(
                "{tabs} caption(s) contained tabs; they were replaced by spaces"
            ));
        }
        let ranges = lines
            .iter()
            .map(|l| {
                let start = l.as_ptr() as usize - bytes.as_ptr() as usize;
                start..start + l.len()
            })
            .collect::<Vec<_>>();
        let n = ranges.len() as u64;
        let mut chunks = Chunks::even(
            Lines {
                source: source.display().to_string(),
                bytes,
                ranges,
                outcomes,
                orphans,
            },
            n,
            p.chunk_rows as u64,
            "lines",
        );
        chunks = chunks.in_parallel();
        Ok(chunks)
    }

    fn run_shared(
        p: &IngestParams,
        w: &Lines,
        k: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let n = w.ranges.len();
        let lo = (k * p.chunk_rows).min(n);
        let hi = ((k + 1) * p.chunk_rows).min(n);
        let last = k + 1 == n.div_ceil(p.chunk_rows).max(1);
        let extra: &[(String, String)] = if last { &w.orphans } else { &[] };
        let lines: Vec<&[u8]> = w.ranges[lo..hi]
            .iter()
            .map(|r| &w.bytes[r.clone()])
            .collect();
        let (caps, rej) = build_chunk(lo, &lines, &w.outcomes[lo..hi], extra, &w.source)?;
        Ok(Some(vec![("rejects", rej), ("captions", caps)]))
    }
}

/// The source file cut into lines, each with its outcome.
pub(crate) struct Lines {
    source: String,
    bytes: Vec<u8>,
    ranges: Vec<std::ops::Range<usize>>,
    outcomes: Vec<Outcome>,
    /// Image files no caption names (image-folder format): rejects of the last chunk.
    orphans: Vec<(String, String)>,
}

/// `{id}` or `{id:0N}` inside a file name pattern.
struct ImageName<'a> {
    prefix: &'a str,
    width: usize,
    suffix: &'a str,
}

impl<'a> ImageName<'a> {
    fn parse(pattern: &'a str) -> std::result::Result<ImageName<'a>, String> {
        let err =
            || format!("'{pattern}' must contain {{id}} or {{id:0N}} once, e.g. \"{{id}}.jpg\"");
        let start = pattern.find("{id").ok_or_else(err)?;
        let end = start + pattern[start..].find('}').ok_or_else(err)?;
        let spec = &pattern[start + 3..end];
        let width = match spec {
            "" => 0,
            s if s.starts_with(":0") => s[2..].parse().map_err(|_| err())?,
            _ => return Err(err()),
        };
        if pattern[end + 1..].contains("{id") {
            return Err(err());
        }
        Ok(ImageName {
            prefix: &pattern[..start],
            width,
            suffix: &pattern[end + 1..],
        })
    }

    fn format(&self, id: usize) -> String {
        format!("{}{:0w$}{}", self.prefix, id, self.suffix, w = self.width)
    }
}

struct Row {
    image_id: i64,
    caption: String,
    image_path: Option<String>,
    url: Option<String>,
    had_tab: bool,
    /// For duplicate detection (JSONL: the id; image folder: the file).
    key: Option<String>,
}

enum Outcome {
    Row(Row),
    Reject(String),
}

/// Lines without their terminator; CRLF and a leading BOM are removed. A
/// final line without a newline still counts; a trailing newline does not
/// start another line.
fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // Classic Mac files end lines with CR alone: with no LF anywhere, CR
    // is the line end (as pandas' reader takes it), not one giant line.
    let end_byte =
        if memchr::memchr(b'\n', bytes).is_none() && memchr::memchr(b'\r', bytes).is_some() {
            b'\r'
        } else {
            b'\n'
        };
    let mut out = Vec::new();
    let mut start = 0;
    for end in memchr::memchr_iter(end_byte, bytes) {
        out.push(&bytes[start..end]);
        start = end + 1;
    }
    if start < bytes.len() {
        out.push(&bytes[start..]);
    }
    for l in out.iter_mut() {
        if let Some(s) = l.strip_suffix(b"\r") {
            *l = s;
        }
    }
    out
}

/// Common checks: length, UTF-8, blank, control characters.
fn checked_text(line: &[u8], max: usize) -> std::result::Result<&str, String> {
    if line.len() > max {
        return Err(format!(
            "line is {} bytes, over max_line_bytes = {max}",
            line.len()
        ));
    }
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    if text.trim().is_empty() {
        return Err("blank line".into());
    }
    if let Some(c) = text.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(format!(
            "control character U+{:04X} (binary data?)",
            c as u32
        ));
    }
    Ok(text)
}

fn clean_caption(raw: &str) -> (String, bool) {
    let had_tab = raw.contains('\t');
    let c = if had_tab {
        raw.replace('\t', " ")
    } else {
        raw.to_string()
    };
    (c.trim().to_string(), had_tab)
}

fn parse_tsv(i: usize, line: &[u8], p: &IngestParams, images_dir: Option<&Path>) -> Outcome {
    let text = match checked_text(line, p.max_line_bytes) {
        Ok(t) => t,
        Err(r) => return Outcome::Reject(r),
    };
    let Some((caption, url)) = text.rsplit_once('\t') else {
        return Outcome::Reject("missing tab: expected caption<TAB>url".into());
    };
    let (caption, had_tab) = clean_caption(caption);
    if caption.is_empty() {
        return Outcome::Reject("empty caption".into());
    }
    let url = url.trim();
    let name = ImageName::parse(&p.image_name).expect("validated");
    Outcome::Row(Row {
        image_id: i as i64,
        caption,
        image_path: images_dir.map(|d| d.join(name.format(i)).display().to_string()),
        url: (!url.is_empty()).then(|| url.to_string()),
        had_tab,
        key: None,
    })
}

#[derive(Deserialize)]
struct JsonCaption {
    image_id: serde_json::Value,
    caption: String,
    #[serde(default)]
    image_path: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

fn parse_jsonl(
    line: &[u8],
    p: &IngestParams,
    images_dir: Option<&Path>,
    file_dir: &Path,
) -> Outcome {
    let text = match checked_text(line, p.max_line_bytes) {
        Ok(t) => t,
        Err(r) => return Outcome::Reject(r),
    };
    let j: JsonCaption = match serde_json::from_str(text) {
        Ok(j) => j,
        Err(e) => return Outcome::Reject(format!("not a caption object: {e}")),
    };
    let id = match &j.image_id {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let Some(id) = id.filter(|&i| i >= 0) else {
        return Outcome::Reject(format!(
            "image_id must be a non-negative integer, got {}",
            j.image_id
        ));
    };
    let (caption, had_tab) = clean_caption(&j.caption);
    if caption.is_empty() {
        return Outcome::Reject("empty caption".into());
    }
    let url = j.url.filter(|u| !u.trim().is_empty());
    let image_path = j.image_path.filter(|s| !s.trim().is_empty()).map(|ip| {
        let ip = Path::new(&ip);
        let base = images_dir.unwrap_or(file_dir);
        crate::framework::stage::resolve_path(base, ip)
            .display()
            .to_string()
    });
    if image_path.is_none() && url.is_none() {
        return Outcome::Reject("needs image_path or url".into());
    }
    Outcome::Row(Row {
        image_id: id,
        caption,
        image_path,
        url,
        had_tab,
        key: Some(id.to_string()),
    })
}

fn parse_folder_line(line: &[u8], p: &IngestParams, folder: &Path) -> Outcome {
    let text = match checked_text(line, p.max_line_bytes) {
        Ok(t) => t,
        Err(r) => return Outcome::Reject(r),
    };
    let Some((file, caption)) = text.split_once('\t') else {
        return Outcome::Reject("missing tab: expected file<TAB>caption".into());
    };
    let file = file.trim();
    let (caption, had_tab) = clean_caption(caption);
    if caption.is_empty() {
        return Outcome::Reject("empty caption".into());
    }
    let path = folder.join(file);
    if file.is_empty() || !path.is_file() {
        return Outcome::Reject(format!("image file not found: {}", path.display()));
    }
    Outcome::Row(Row {
        image_id: -1,
        caption,
        image_path: Some(path.display().to_string()),
        url: None,
        had_tab,
        key: Some(file.to_string()),
    })
}

/// Second and later uses of a key become rejects. Image-folder ids are the
/// line numbers, assigned here.
fn mark_duplicates(outcomes: &mut [Outcome], format: Format) {
    let mut first: HashMap<String, usize> = HashMap::new();
    for (i, o) in outcomes.iter_mut().enumerate() {
        let Outcome::Row(r) = o else { continue };
        if format == Format::ImageFolder {
            r.image_id = i as i64;
        }
        let Some(key) = r.key.take() else { continue };
        if let Some(&f) = first.get(&key) {
            let what = if format == Format::Jsonl {
                "image_id"
            } else {
                "image file"
            };
            *o = Outcome::Reject(format!("duplicate {what} {key} (first on line {})", f + 1));
        } else {
            first.insert(key, i);
        }
    }
}

const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif"];

/// Images in the folder that no caption line names: reported, not dropped.
fn uncaptioned_images(
    folder: &Path,
    captions: &Path,
    outcomes: &[Outcome],
) -> Result<Vec<(String, String)>> {
    let used: std::collections::HashSet<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Row(r) => r.image_path.as_deref(),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    let rd = std::fs::read_dir(folder).map_err(Error::io("cannot list", folder))?;
    let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let ext = f
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if f.is_file()
            && IMAGE_EXTS.contains(&ext.as_str())
            && !used.contains(f.display().to_string().as_str())
        {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            out.push((
                name,
                format!("image has no caption line in {}", captions.display()),
            ));
        }
    }
    Ok(out)
}

fn raw_excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(512)];
    String::from_utf8_lossy(cut).into_owned()
}

fn build_chunk(
    first_line: usize,
    lines: &[&[u8]],
    outcomes: &[Outcome],
    extra_rejects: &[(String, String)],
    source: &str,
) -> Result<(RecordBatch, RecordBatch)> {
    let mut id = Int64Builder::with_capacity(outcomes.len());
    let mut cap = StringBuilder::new();
    let mut path = StringBuilder::new();
    let mut url = StringBuilder::new();
    let mut rejects = RejectRows::default();
    for (j, o) in outcomes.iter().enumerate() {
        match o {
            Outcome::Row(r) => {
                id.append_value(r.image_id);
                cap.append_value(&r.caption);
                path.append_option(r.image_path.as_deref());
                url.append_option(r.url.as_deref());
            }
            Outcome::Reject(reason) => {
                rejects.push(
                    source,
                    Some((first_line + j + 1) as i64),
                    reason,
                    &raw_excerpt(lines[j]),
                );
            }
        }
    }
    for (file, reason) in extra_rejects {
        rejects.push(source, None, reason, file);
    }
    let caps = RecordBatch::try_new(
        CAPTIONS_SCHEMA.clone(),
        vec![
            Arc::new(id.finish()) as ArrayRef,
            Arc::new(cap.finish()),
            Arc::new(path.finish()),
            Arc::new(url.finish()),
        ],
    )?;
    Ok((caps, rejects.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_strip_bom_and_crlf() {
        let l = split_lines(b"\xEF\xBB\xBFa\tb\r\n\r\nc");
        assert_eq!(l, vec![&b"a\tb"[..], b"", b"c"]);
        assert_eq!(split_lines(b"x\n").len(), 1);
        assert!(split_lines(b"").is_empty());
        // CR alone ends lines only in a file without LF.
        assert_eq!(split_lines(b"a\rb\rc"), vec![&b"a"[..], b"b", b"c"]);
        assert_eq!(split_lines(b"a\rb\nc"), vec![&b"a\rb"[..], b"c"]);
    }

    #[test]
    fn image_name_patterns() {
        assert_eq!(ImageName::parse("{id}").unwrap().format(7), "7");
        assert_eq!(
            ImageName::parse("img_{id:05}.jpg").unwrap().format(42),
            "img_00042.jpg"
        );
        assert!(ImageName::parse("nothing").is_err());
        assert!(ImageName::parse("{id:x}").is_err());
    }

    #[test]
    fn control_chars_and_utf8_are_rejected() {
        assert!(checked_text(b"a\x00b", 100).is_err());
        assert!(checked_text(b"\xff\xfe", 100).is_err());
        assert!(checked_text(b"   ", 100).is_err());
        assert!(checked_text(b"caf\xc3\xa9\tu", 100).is_ok());
        assert!(checked_text(&[b'a'; 200], 100).is_err());
    }
}
