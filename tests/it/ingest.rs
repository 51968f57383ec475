//! The ingest stage on the real CC3M validation file and on hostile input.

use crate::common::*;

#[test]
fn real_cc3m_validation_file() {
    let Some(tsv) = shared("data/cc3m/Validation_GCC-1.1.0-Validation.tsv") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let m = ingest_manifest(
        dir.path(),
        tsv.to_str().unwrap(),
        ", format = \"cc3m-tsv\", chunk_rows = 4000",
    );
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert!(
        r.ok().stdout.contains("captions 15,833, rejects 0"),
        "{}",
        r.stdout
    );
    let run = dir.path().join("run");
    let rows = sql_csv(&run, "SELECT count(*), min(image_id), max(image_id), count(DISTINCT image_id), count(url) FROM captions");
    assert_eq!(rows[1], "15833,0,15832,15833,15833");
    // image_id is the 0-based row number: compare with the file itself.
    let text = std::fs::read_to_string(&tsv).unwrap();
    let line_100 = text.lines().nth(100).unwrap();
    let (caption, url) = line_100.rsplit_once('\t').unwrap();
    let r = genecis(&[
        "sql",
        run.to_str().unwrap(),
        "SELECT caption, url FROM captions WHERE image_id = 100",
        "--format",
        "json",
    ]);
    let got: serde_json::Value = serde_json::from_str(r.ok().stdout.trim()).unwrap();
    assert_eq!(got["caption"], caption);
    assert_eq!(got["url"], url);
}

#[test]
fn real_file_through_the_shipped_manifest() {
    if shared("data/cc3m/Validation_GCC-1.1.0-Validation.tsv").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/cc3m_val.toml");
    let w = dir.path().join("w");
    genecis(&[
        "run",
        manifest.to_str().unwrap(),
        "--workdir",
        w.to_str().unwrap(),
        "-q",
    ])
    .ok();
    let r = genecis(&["sql", w.to_str().unwrap(), "SELECT count(*) FROM captions"]);
    assert!(r.ok().stdout.contains("| 15833    |"), "{}", r.stdout);
}

/// CRLF, BOM, blank lines, tabs inside a caption, binary garbage, invalid
/// UTF-8, an over-long line, a line without tab, an empty caption.
fn hostile_tsv() -> Vec<u8> {
    let mut b: Vec<u8> = Vec::new();
    b.extend_from_slice(b"\xEF\xBB\xBFa dog on a bench .\thttp://x/0.jpg\r\n"); // 1: BOM + CRLF
    b.extend_from_slice(b"\r\n"); // 2: blank
    b.extend_from_slice(b"a cat\tsitting on a mat .\thttp://x/2.jpg\n"); // 3: tab in caption
    b.extend_from_slice(b"\x00\x01\x02garbage\x07\tz\n"); // 4: binary garbage (valid UTF-8)
    b.extend_from_slice(b"caf\xe9 au lait\thttp://x/4.jpg\n"); // 5: latin-1, invalid UTF-8
    b.extend_from_slice(format!("{}\thttp://x/5.jpg\n", "long ".repeat(20_000)).as_bytes()); // 6: over-long
    b.extend_from_slice(b"no tab on this line\n"); // 7
    b.extend_from_slice(b"   \thttp://x/7.jpg\n"); // 8: empty caption
    b.extend_from_slice("un caf\u{e9} cr\u{e8}me sur la table .\thttp://x/8.jpg\n".as_bytes()); // 9: fine UTF-8
    b.extend_from_slice(b"a caption without url\t\n"); // 10: empty url -> NULL
    b.extend_from_slice(b"last line without newline\thttp://x/10.jpg"); // 11
    b
}

#[test]
fn hostile_file_goes_to_rejects_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("hostile.tsv"), hostile_tsv());
    write(&dir.path().join("imgs/.keep"), "");
    let m = ingest_manifest(
        dir.path(),
        "hostile.tsv",
        ", chunk_rows = 3, images_dir = \"imgs\", image_name = \"{id:04}.jpg\"",
    );
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("6 line(s) rejected"), "{}", r.stdout);
    assert!(
        r.stdout.contains("1 caption(s) contained tabs"),
        "{}",
        r.stdout
    );
    let run = dir.path().join("run");
    let caps = sql_csv(
        &run,
        "SELECT image_id, caption, url IS NULL FROM captions ORDER BY image_id",
    );
    assert_eq!(
        caps[1..],
        [
            "0,a dog on a bench .,false",
            "2,a cat sitting on a mat .,false",
            "8,un caf\u{e9} cr\u{e8}me sur la table .,false",
            "9,a caption without url,true",
            "10,last line without newline,false",
        ]
    );
    let path = sql_csv(&run, "SELECT image_path FROM captions WHERE image_id = 8");
    assert!(path[1].ends_with("imgs/0008.jpg"), "{path:?}");
    let rej = sql_csv(
        &run,
        "SELECT line_number, reason FROM rejects ORDER BY line_number",
    );
    let reasons: Vec<&str> = rej[1..].iter().map(|s| s.as_str()).collect();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(reasons[0].starts_with("2,blank line"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("4,control character U+0000"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].starts_with("5,invalid UTF-8 at byte 3"),
        "{reasons:?}"
    );
    assert!(
        reasons[3].starts_with("6,\"line is 100015 bytes"),
        "{reasons:?}"
    );
    assert!(reasons[4].starts_with("7,missing tab"), "{reasons:?}");
    assert!(reasons[5].starts_with("8,empty caption"), "{reasons:?}");
    // Every line is accounted for.
    let n = sql_csv(
        &run,
        "SELECT (SELECT count(*) FROM captions) + (SELECT count(*) FROM rejects)",
    );
    assert_eq!(n[1], "11");
}

#[test]
fn jsonl_input_with_duplicates_and_bad_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("c.jsonl"),
        concat!(
            "{\"image_id\": 5, \"caption\": \"a red ball\", \"image_path\": \"img/5.jpg\"}\n",
            "{\"image_id\": \"6\", \"caption\": \"a blue cube\", \"url\": \"http://x/6.jpg\", \"extra\": 1}\n",
            "{\"image_id\": 5, \"caption\": \"dup\", \"url\": \"http://x/5b.jpg\"}\n",
            "{\"image_id\": 7, \"caption\": \"no location\"}\n",
            "{\"image_id\": -1, \"caption\": \"neg\", \"url\": \"u\"}\n",
            "not json\n",
            "[1,2]\n",
        ),
    );
    let m = ingest_manifest(dir.path(), "c.jsonl", "");
    genecis(&["run", m.to_str().unwrap()]).ok();
    let run = dir.path().join("run");
    let caps = sql_csv(
        &run,
        "SELECT image_id, caption, url FROM captions ORDER BY image_id",
    );
    assert_eq!(caps[1..], ["5,a red ball,", "6,a blue cube,http://x/6.jpg"]);
    let p = sql_csv(&run, "SELECT image_path FROM captions WHERE image_id = 5");
    assert!(
        p[1].ends_with("img/5.jpg") && p[1].starts_with('/'),
        "{p:?}"
    );
    let rej = sql_csv(
        &run,
        "SELECT line_number, reason FROM rejects ORDER BY line_number",
    );
    assert_eq!(rej.len(), 6, "{rej:?}");
    assert!(
        rej[1].starts_with("3,duplicate image_id 5 (first on line 1)"),
        "{rej:?}"
    );
    assert!(rej[2].starts_with("4,needs image_path or url"), "{rej:?}");
    assert!(rej[3].contains("non-negative integer"), "{rej:?}");
    assert!(rej[4].starts_with("6,not a caption object"), "{rej:?}");
}

#[test]
fn image_folder_with_captions_file() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    for name in ["a.jpg", "b.png", "orphan.jpg"] {
        image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
            .save(imgs.join(name))
            .unwrap_or_else(|_| {
                std::fs::create_dir_all(&imgs).unwrap();
                image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
                    .save(imgs.join(name))
                    .unwrap()
            });
    }
    write(&imgs.join("captions.tsv"), "a.jpg\ta red square .\nb.png\tanother red square .\nmissing.jpg\tnothing here\na.jpg\tagain\n");
    let m = ingest_manifest(dir.path(), "imgs", ", format = \"image-folder\"");
    genecis(&["run", m.to_str().unwrap()]).ok();
    let run = dir.path().join("run");
    let caps = sql_csv(
        &run,
        "SELECT image_id, caption FROM captions ORDER BY image_id",
    );
    assert_eq!(caps[1..], ["0,a red square .", "1,another red square ."]);
    let rej = sql_csv(&run, "SELECT coalesce(CAST(line_number AS VARCHAR), '-'), reason, raw FROM rejects ORDER BY line_number NULLS LAST");
    assert_eq!(rej.len(), 4, "{rej:?}");
    assert!(rej[1].starts_with("3,image file not found"), "{rej:?}");
    assert!(
        rej[2].starts_with("4,duplicate image file a.jpg"),
        "{rej:?}"
    );
    assert!(
        rej[3].starts_with("-,image has no caption line") && rej[3].ends_with("orphan.jpg"),
        "{rej:?}"
    );
}

#[test]
fn missing_file_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = ingest_manifest(dir.path(), "absent.tsv", "");
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("absent.tsv does not exist"),
        "{}",
        r.stderr
    );
}
