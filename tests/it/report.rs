//! `report.html` in a real browser (headless Chromium), the error-analysis
//! tables and queries, and the audit on templates built to hold each
//! defect once.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{genecis, sql_csv, write};
use crate::eval::{jpeg, manifest, small_world};

/// Debian's chromium (installed by scripts/setup.sh where it can be).
pub(crate) fn chromium() -> Option<PathBuf> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(o) = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
        {
            let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && !p.is_empty() {
                return Some(PathBuf::from(p));
            }
        }
    }
    eprintln!("NOTICE: no chromium on PATH (scripts/setup.sh installs Debian's); the browser test is skipped");
    None
}

pub(crate) fn browser(chrome: &Path, args: &[&str]) -> String {
    let out = Command::new(chrome)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--allow-file-access-from-files",
            "--virtual-time-budget=8000",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `data-NAME="N"` of the first element that has it.
pub(crate) fn attr(dom: &str, name: &str) -> usize {
    let pat = format!("data-{name}=\"");
    let at = dom
        .find(&pat)
        .unwrap_or_else(|| panic!("no {pat} in the DOM"));
    let rest = &dom[at + pat.len()..];
    rest[..rest.find('"').unwrap()].parse().unwrap()
}

#[test]
fn report_page_renders_and_filters_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = manifest(tmp.path(), &w, true);
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let stage = tmp.path().join("run/score");
    let page = stage.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    // Offline: nothing fetched from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(html.contains("Provenance") && html.contains("blake3"));
    // One thumbnail per key (20 COCO images, 8 VAW crops) plus the boxes.
    let thumbs = std::fs::read_dir(stage.join("thumbs")).unwrap().count();
    assert!(thumbs >= 20, "{thumbs} thumbnails");
    // The error-analysis tables and queries.
    let rbc = sql_csv(
        &tmp.path().join("run"),
        "SELECT sum(n) FROM recall_by_condition WHERE method = 'combiner'",
    );
    assert_eq!(rbc[1], "10", "every template counted once per method");
    for file in [
        "recall_by_condition.sql",
        "target_rank_distribution.sql",
        "combiner_wins_losses.sql",
        "hardest_conditions.sql",
        "audit_counts.sql",
        "demo_results.sql",
    ] {
        let out = crate::common::example_sql(&m, file);
        assert!(out.lines().count() >= 2, "{file}: {out}");
    }
    let Some(chrome) = chromium() else {
        return;
    };
    let url = |hash: &str| format!("file://{}#eager=1{hash}", page.display());
    let all = browser(&chrome, &["--dump-dom", &url("&method=image_only")]);
    assert_eq!(attr(&all, "count"), 10, "6 COCO + 4 VAW templates");
    assert_eq!(attr(&all, "broken"), 0, "no broken images");
    assert!(
        attr(&all, "loaded") >= 50,
        "images loaded: {}",
        attr(&all, "loaded")
    );
    let hits = attr(
        &browser(
            &chrome,
            &["--dump-dom", &url("&method=image_only&outcome=hit")],
        ),
        "count",
    );
    let misses = attr(
        &browser(
            &chrome,
            &["--dump-dom", &url("&method=image_only&outcome=miss")],
        ),
        "count",
    );
    assert_eq!(hits + misses, 10, "the outcome filter splits the cards");
    let coco = attr(
        &browser(
            &chrome,
            &["--dump-dom", &url("&method=image_only&task=focus_object")],
        ),
        "count",
    );
    assert_eq!(coco, 6, "the task filter");
    let cmp = browser(
        &chrome,
        &[
            "--dump-dom",
            &url("&view=compare&a=combiner&b=image_plus_text"),
        ],
    );
    assert!(cmp.contains("id=\"wins\""), "the comparison view");
    // A screenshot, kept as a test artefact.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    browser(
        &chrome,
        &[
            "--window-size=1280,1800",
            &format!("--screenshot={}", shot.display()),
            &url(""),
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} ({size} bytes)",
        shot.display()
    );
    // The cards alone (the summary hidden), as the README shows them.
    let cards = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-cards.png");
    browser(
        &chrome,
        &[
            "--window-size=1000,900",
            &format!("--screenshot={}", cards.display()),
            &url("&summary=0&method=combiner"),
        ],
    );
    assert!(cards.is_file());
}

/// COCO-style templates, gallery 14, each holding one defect.
#[test]
fn audit_finds_each_defect_once() {
    let tmp = tempfile::tempdir().unwrap();
    let coco = tmp.path().join("coco");
    for id in 1..=40u64 {
        jpeg(&coco.join(format!("{id:012}.jpg")), id * 7 + 1, 48, 40);
    }
    // Byte-identical copies: 31 of 30 (a near duplicate), 41..=54 of 40.
    // The tiny random CLIP puts distinct pictures close together, so the
    // threshold is set just below 1 (identical files give cosine 1).
    std::fs::copy(
        coco.join(format!("{:012}.jpg", 30)),
        coco.join(format!("{:012}.jpg", 31)),
    )
    .unwrap();
    for id in 41..=54u64 {
        std::fs::copy(
            coco.join(format!("{:012}.jpg", 40)),
            coco.join(format!("{id:012}.jpg")),
        )
        .unwrap();
    }
    let r = |id: u64| format!("{{\"val_image_id\": {id}}}");
    let t = |cond: &str, reference: u64, target: u64, gallery: Vec<u64>| {
        assert_eq!(gallery.len(), 14);
        let g: Vec<String> = gallery.into_iter().map(r).collect();
        format!(
            "{{\"condition\": \"{cond}\", \"reference\": {}, \"target\": {}, \"gallery\": [{}]}}",
            r(reference),
            r(target),
            g.join(", ")
        )
    };
    let templates = [
        // 0: distractor 3 twice.
        t("dog", 1, 2, [3, 3].into_iter().chain(4..=15).collect()),
        // 1: the target among the distractors.
        t("dog", 1, 2, [2].into_iter().chain(16..=28).collect()),
        // 2: a distractor identical to the target.
        t("cat", 1, 30, [31].into_iter().chain(3..=15).collect()),
        // 3: a condition that occurs once.
        t("zebra", 1, 2, (3..=16).collect()),
        // 4: every distractor is the reference's picture: image_only fails.
        t("cat", 40, 2, (41..=54).collect()),
    ];
    let file = tmp.path().join("focus_object.json");
    write(&file, format!("[{}]", templates.join(",\n")));
    let vit = crate::model::fixtures().join("vit_state.pt");
    let m = crate::common::Manifest::new("audit")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "focus_object = \"{}\", coco_dir = \"{}\"",
                file.display(),
                coco.display()
            ),
        )
        .stage(
            "embed",
            "embed",
            &["templates"],
            &format!("checkpoint = \"{}\", device = \"cpu\"", vit.display()),
        )
        .stage(
            "score",
            "score",
            &["templates", "embed"],
            "methods = [\"image_only\"], device = \"cpu\", near_duplicate = 0.99999",
        )
        .write(tmp.path());
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let rows = sql_csv(
        &tmp.path().join("run"),
        "SELECT template_id, \"check\" FROM audit WHERE \"check\" <> 'all_methods_fail_at_3' ORDER BY template_id, \"check\"",
    );
    assert_eq!(
        rows[1..],
        [
            "0,duplicate_in_gallery",
            "1,target_among_distractors",
            "2,near_duplicate_target_distractor",
            "3,singleton_condition"
        ]
    );
    let fail = sql_csv(
        &tmp.path().join("run"),
        "SELECT count(*) FROM audit WHERE \"check\" = 'all_methods_fail_at_3' AND template_id = 4",
    );
    assert_eq!(fail[1], "1");
    // The command: key checks on the file, all checks from the run.
    let out = genecis(&["audit", file.to_str().unwrap()]);
    let text = &out.ok().stdout;
    for line in [
        "duplicate_in_gallery               1",
        "target_among_distractors           1",
        "singleton_condition                1",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    let run = genecis(&["audit", m.to_str().unwrap()]);
    assert!(
        run.ok()
            .stdout
            .contains("near_duplicate_target_distractor   1"),
        "{}",
        run.stdout
    );
}

/// The key checks on the official object templates: what the README lists.
#[test]
fn audit_of_the_official_object_templates() {
    let (Some(fo), Some(co)) = (
        crate::common::shared("data/genecis/focus_object.json"),
        crate::common::shared("data/genecis/change_object.json"),
    ) else {
        return;
    };
    let r = genecis(&["audit", fo.to_str().unwrap(), co.to_str().unwrap()]);
    let out = &r.ok().stdout;
    let (f, c) = out.split_at(out.find("change_object.json").unwrap());
    assert!(f.contains("target_among_distractors           0"), "{f}");
    assert!(f.contains("singleton_condition                5"), "{f}");
    assert!(c.contains("target_among_distractors           1"), "{c}");
    assert!(
        c.contains("#19 target_among_distractors: coco/000000175364.jpg is also distractor 13"),
        "{c}"
    );
    assert!(c.contains("singleton_condition                5"), "{c}");
}
