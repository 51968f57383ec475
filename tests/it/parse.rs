//! The caption parser: reference scores, robustness, and the stage.

use genecis::parse::{parse_caption, Engine};

use crate::common::*;

fn triples_with(engine: Engine, caption: &str) -> Vec<(String, String, String)> {
    genecis::parse::eval::predicted_all(
        &[caption],
        true,
        engine,
        genecis::parse::Learned::shipped(),
    )
    .unwrap()
    .remove(0)
    .1
}

fn t(s: &str, r: &str, o: &str) -> (String, String, String) {
    (s.into(), r.into(), o.into())
}

#[test]
fn v010_semantics_and_quirks() {
    for engine in [Engine::Spacy, Engine::Rules] {
        v010_semantics_and_quirks_of(engine);
    }
}

fn v010_semantics_and_quirks_of(engine: Engine) {
    let triples = |c: &str| triples_with(engine, c);
    let parse_caption = |c: &str, _strict: bool| {
        genecis::parse::parse_captions(&[c], engine, true, genecis::parse::Learned::shipped())
            .unwrap()
            .remove(0)
    };
    assert_eq!(
        triples("a man riding a horse on the beach"),
        vec![t("man", "on", "beach"), t("man", "riding", "horse")]
    );
    assert_eq!(
        triples("a young woman sitting on a wooden bench"),
        vec![t("woman", "sitting on", "bench")]
    );
    assert_eq!(
        triples("a bird on top of a tree"),
        vec![t("bird", "on top of", "tree")]
    );
    assert_eq!(
        triples("a woman standing next to a car"),
        vec![t("woman", "next to", "car")]
    );
    assert_eq!(
        triples("cars and trucks on the highway"),
        vec![t("cars", "on", "highway"), t("trucks", "on", "highway")]
    );
    // Quirks of 0.1.0 on spaCy 3: copula + PP and VERB + "in front of" give nothing.
    assert!(triples("the dog is on the bed").is_empty());
    assert!(triples("a man standing in front of a building").is_empty());
    // Heads are surface text with one compound level; pronouns are kept.
    let g = parse_caption("ice cream cone on a white background", true);
    assert_eq!(g.entities[0].head, "cream cone");
    assert_eq!(
        triples("she is playing the piano"),
        vec![t("she", "playing", "piano")]
    );
    let g = parse_caption("two dogs on the beach", true);
    assert_eq!(g.entities[0].head, "dogs");
    assert_eq!(g.entities[0].lemma_head, "dog");
    assert_eq!(g.entities[0].modifiers, vec!["two"]);
    assert_eq!(g.entities[1].kind, "scene");
}

#[test]
fn rules_engine_gold_captions_at_least_55_of_58() {
    let Some(gold) = shared("data/cc3m/sg_gold.dev.json") else {
        return;
    };
    let s = genecis::parse::eval::score_gold(&gold, true, Engine::Rules).unwrap();
    eprintln!(
        "gold: {}/{} exact, {}/{} with alternatives",
        s.exact, s.n, s.exact_or_alternative, s.n
    );
    assert_eq!(s.n, 58);
    assert!(
        s.exact >= 55,
        "{} of 58 exact:\n{}",
        s.exact,
        s.misses.join("\n")
    );
}

/// A floor against regressions; the figures are printed (the issue's
/// targets are higher and not met yet: see the closing notes).
#[test]
fn rules_engine_dev_set_scores() {
    let Some(dev) = shared("data/cc3m/reference_parses.dev.jsonl") else {
        return;
    };
    let s = genecis::parse::eval::score_dev(&dev, true, Engine::Rules).unwrap();
    eprintln!(
        "dev: relation F1 {:.4} (P {:.4} R {:.4}), entity F1 {:.4}",
        s.relations.f1(),
        s.relations.precision(),
        s.relations.recall(),
        s.entities.f1()
    );
    assert_eq!(s.captions, 7917);
    // The shipped models were trained on this set: floors against
    // regressions, not estimates (parse-train prints held-out scores).
    assert!(s.relations.f1() > 0.82, "relation F1 {}", s.relations.f1());
    assert!(s.entities.f1() > 0.97, "entity F1 {}", s.entities.f1());
    let rules = genecis::parse::eval::score_dev_with(
        &dev,
        true,
        Engine::Rules,
        genecis::parse::Learned::none(),
    )
    .unwrap();
    assert!(
        rules.relations.f1() > 0.61,
        "rules: relation F1 {}",
        rules.relations.f1()
    );
    assert!(
        rules.entities.f1() > 0.89,
        "rules: entity F1 {}",
        rules.entities.f1()
    );
}

#[test]
fn hostile_captions_never_panic() {
    let long = "dog ".repeat(10_000);
    for c in [
        "",
        "   ",
        "\t\n",
        "...",
        "!!! ??? ,,, ;;",
        "日本語のキャプション",
        "ça va très bien à côté du café",
        &long,
        "'s 's 's",
        "( ) [ ] \" '",
    ] {
        let g = parse_caption(c, true);
        for r in &g.relations {
            assert!(r.subject < g.entities.len() && r.object < g.entities.len());
        }
    }
    for s in random_captions(0x2545F4914F6CDD1D, 3000) {
        assert_graph_ok(&parse_caption(&s, true), &s);
    }
}

/// Seeded random strings mixing characters of a hostile alphabet with
/// caption words, so failures reproduce.
fn random_captions(seed: u64, count: usize) -> Vec<String> {
    let alphabet: Vec<char> =
        "abcdefghij klmnop qrstuvwxyz  ,.:;!?'\"-()[]#$£~0123456789éüñ日本🙂\t"
            .chars()
            .collect();
    let words = [
        "a",
        "the",
        "dog",
        "on",
        "in front of",
        "is",
        "and",
        ",",
        "sitting",
        "of",
        "by",
        "'s",
        "that",
        "next",
        "to",
    ];
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let n = (next() % 40) as usize;
            let mut s = String::new();
            for _ in 0..n {
                if next() % 2 == 0 {
                    s.push(alphabet[(next() % alphabet.len() as u64) as usize]);
                } else {
                    s.push_str(words[(next() % words.len() as u64) as usize]);
                    s.push(' ');
                }
            }
            s
        })
        .collect()
}

/// Every relation points at entities of its graph.
fn assert_graph_ok(g: &genecis::parse::SceneGraph, caption: &str) {
    for r in &g.relations {
        assert!(
            r.subject < g.entities.len() && r.object < g.entities.len(),
            "{caption:?}"
        );
    }
}

#[test]
fn parse_stage_writes_entities_and_relations() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("c.tsv"),
        "a dog sitting on a bench .\tu0\n\ta man riding a horse on the beach\tu1\ntwo cats sleeping on a wooden table\tu2\n",
    );
    let m = dir.path().join("m.toml");
    write(
        &m,
        "[pipeline]\nname = \"p\"\nworkdir = \"run\"\n\n[[stage]]\nname = \"captions\"\nkind = \"ingest\"\nparams = { path = \"c.tsv\", chunk_rows = 2 }\n\n[[stage]]\nname = \"graphs\"\nkind = \"parse\"\ninputs = [\"captions\"]\n",
    );
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("+ graphs (parse)"), "{}", r.stdout);
    let rel = sql_csv(&m, "SELECT image_id, subject, relation, object, subject_idx, object_idx FROM relations ORDER BY image_id, relation_idx");
    assert_eq!(
        rel[1..],
        [
            "0,dog,sitting on,bench,0,1",
            "1,man,riding,horse,0,1",
            "1,man,on,beach,0,2",
            "2,cats,sleeping on,table,0,1"
        ]
    );
    let ent = sql_csv(&m, "SELECT head, lemma_head, array_to_string(modifiers, '|'), kind FROM entities WHERE image_id = 2 ORDER BY entity_idx");
    assert_eq!(
        ent[1..],
        ["cats,cat,two,unknown", "table,table,a|wooden,unknown"]
    );
}

#[test]
fn strict_v010_false_switches_on_the_later_fixes() {
    let loose = |c: &str| genecis::parse::eval::predicted(c, false).1;
    assert_eq!(loose("the dog is on the bed"), vec![t("dog", "on", "bed")]);
    assert_eq!(
        loose("a man standing in front of a building"),
        vec![t("man", "in front of", "building")]
    );
    assert_eq!(
        parse_caption("ice cream cone on a white background", false).entities[0].head,
        "ice cream cone"
    );
}

/// The shipped chunk-role and attachment weights are what `parse-train`
/// makes from the dev parses with the current rules (a rule change needs a
/// retrain), and each learned part beats the rules on held-out halves.
#[test]
fn learned_weights_are_reproducible_and_help_held_out() {
    let Some(dev) = shared("data/cc3m/reference_parses.dev.jsonl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("attach.tsv");
    let chunks_out = tmp.path().join("chunks.tsv");
    let r = genecis(&[
        "parse-train",
        "--dev",
        dev.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--chunks-out",
        chunks_out.to_str().unwrap(),
        "--rule-bonus",
        "4",
        "--verb-rule-bonus",
        "12",
    ]);
    r.ok();
    eprintln!("{}", r.stdout);
    let lexicon = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/parse/lexicon");
    for (made, shipped) in [
        (&out, "attach_weights.tsv.gz"),
        (&chunks_out, "chunk_weights.tsv.gz"),
    ] {
        assert!(
            std::fs::read(made).unwrap() == std::fs::read(lexicon.join(shipped)).unwrap(),
            "the shipped {shipped} is stale: run genecis parse-train --dev {} --rule-bonus 4 --verb-rule-bonus 12 --out src/parse/lexicon/attach_weights.tsv.gz --chunks-out src/parse/lexicon/chunk_weights.tsv.gz",
            dev.display()
        );
    }
    // Per fold: rules, + chunk roles, + both; (relation F1, entity F1).
    let rows: Vec<(f64, f64)> = r
        .stdout
        .lines()
        .filter(|l| l.contains("relation F1 "))
        .map(|l| {
            let num = |key: &str| -> f64 {
                let i = l.find(key).unwrap() + key.len();
                l[i..].split_whitespace().next().unwrap().parse().unwrap()
            };
            (num("relation F1 "), num("entity F1 "))
        })
        .collect();
    assert_eq!(rows.len(), 6, "two folds of three rows");
    for fold in rows.chunks(3) {
        let (rules, chunks, both) = (fold[0], fold[1], fold[2]);
        assert!(
            chunks.1 > rules.1 + 0.01,
            "held-out entity F1 {} vs rules {}",
            chunks.1,
            rules.1
        );
        assert!(
            chunks.0 > rules.0,
            "held-out relation F1 {} vs rules {}",
            chunks.0,
            rules.0
        );
        assert!(
            both.0 > chunks.0,
            "held-out relation F1 {} vs chunk roles alone {}",
            both.0,
            chunks.0
        );
    }
}

#[test]
fn learned_attachment_can_be_switched_off() {
    let c = "single cowboy guiding a line of horses through the desert";
    let no_attach = genecis::parse::Learned {
        attach: None,
        ..genecis::parse::Learned::shipped()
    };
    let rules = genecis::parse::parse_caption_with(c, true, no_attach);
    let learned = genecis::parse::parse_caption(c, true);
    let trip = |g: &genecis::parse::SceneGraph| -> Vec<(String, String, String)> {
        g.relations
            .iter()
            .map(|r| {
                (
                    g.entities[r.subject].head.clone(),
                    r.relation.clone(),
                    g.entities[r.object].head.clone(),
                )
            })
            .collect()
    };
    eprintln!("rules {:?}\nlearned {:?}", trip(&rules), trip(&learned));
    assert!(trip(&rules).contains(&t("line", "through", "desert")));
    assert_eq!(trip(&rules).len(), trip(&learned).len());
}

/// `learned_chunks = false` parses with the tagger's reading alone: there
/// "beginning" stays a verb and is no entity; the chunk-role model makes it
/// the head noun, as spaCy does.
#[test]
fn learned_chunk_roles_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("c.tsv"),
        "the beginning of the trail\tu0\nhip hop artist performs live on stage\tu1\n",
    );
    let m = dir.path().join("m.toml");
    write(
        &m,
        "[pipeline]\nname = \"p\"\nworkdir = \"run\"\n\n[[stage]]\nname = \"captions\"\nkind = \"ingest\"\nparams = { path = \"c.tsv\" }\n\n[[stage]]\nname = \"graphs\"\nkind = \"parse\"\ninputs = [\"captions\"]\nparams = { engine = \"rules\" }\n",
    );
    let heads = || {
        sql_csv(&m, "SELECT image_id, string_agg(head, '|' ORDER BY entity_idx) FROM entities GROUP BY image_id ORDER BY image_id")
    };
    genecis(&["run", m.to_str().unwrap()]).ok();
    // Two direct compounds come out right to left, as in 0.1.0.
    assert_eq!(
        heads()[1..],
        ["0,beginning|trail", "1,hop hip artist|stage"]
    );
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "--set",
        "graphs.learned_chunks=false",
    ])
    .ok();
    assert_eq!(heads()[1..], ["0,trail", "1,hop artist|stage"]);
}

/// The spacy engine against spaCy itself, token by token, on hand-written
/// captions (tests/fixtures/spacy_parity.jsonl, written by
/// scripts/make_spacy_parity_fixture.py with spaCy 3.8 and en_core_web_sm).
#[test]
fn spacy_engine_matches_spacy_token_by_token() {
    let f =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spacy_parity.jsonl");
    let p = genecis::parse::eval::spacy_parity(&f, 10).unwrap();
    assert!(p.captions >= 40);
    assert_eq!(
        (p.tokens_differ, p.analysis_differs, p.graphs_differ),
        (0, 0, 0),
        "{}",
        p.examples.join("\n")
    );
}

/// The spacy engine on the reference parses: every gold caption, and the
/// dev set to the last triple (printed; the floor allows a float tie).
#[test]
fn spacy_engine_reproduces_the_reference() {
    let (Some(gold), Some(dev)) = (
        shared("data/cc3m/sg_gold.dev.json"),
        shared("data/cc3m/reference_parses.dev.jsonl"),
    ) else {
        return;
    };
    let g = genecis::parse::eval::score_gold(&gold, true, Engine::Spacy).unwrap();
    assert_eq!(
        (g.exact, g.entities_exact),
        (58, 58),
        "{}",
        g.misses.join("\n")
    );
    let s = genecis::parse::eval::score_dev(&dev, true, Engine::Spacy).unwrap();
    eprintln!(
        "spacy engine, dev: relation F1 {:.4}, entity F1 {:.4}, identical captions {}/{}",
        s.relations.f1(),
        s.entities.f1(),
        s.exact_captions,
        s.captions
    );
    assert!(
        s.relations.f1() >= 0.999,
        "relation F1 {}",
        s.relations.f1()
    );
    assert!(s.entities.f1() >= 0.999, "entity F1 {}", s.entities.f1());
}

#[test]
fn spacy_engine_survives_hostile_captions() {
    let long = "dog ".repeat(3_000);
    let mut caps: Vec<String> = [
        "",
        "   ",
        "\t\n",
        "...",
        "!!! ??? ,,, ;;",
        "日本語のキャプション",
        "ça va très bien à côté du café",
        "'s 's 's",
        "( ) [ ] \" '",
        "🙂🙂 -- ~~ $$ £",
        "a\u{0}b",
        "x".repeat(500).as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    caps.push(long);
    caps.extend(random_captions(0x9E3779B97F4A7C15, 300));
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let graphs = genecis::parse::spacy::parse_batch(&refs).unwrap();
    assert_eq!(graphs.len(), caps.len());
    for (c, g) in caps.iter().zip(&graphs) {
        assert_graph_ok(g, c);
    }
}

/// Parsing in one batch or caption by caption gives the same graphs: the
/// pad rows keep each caption's context its own.
#[test]
fn spacy_engine_batching_does_not_change_results() {
    let caps = [
        "a man riding a horse on the beach",
        "dog",
        "the piano is played by a woman in the room",
        "",
        "two dogs and a cat sleeping on the sofa",
    ];
    let together = genecis::parse::spacy::parse_batch(&caps).unwrap();
    for (c, g) in caps.iter().zip(&together) {
        assert_eq!(
            &genecis::parse::spacy::parse_batch(&[c]).unwrap()[0],
            g,
            "{c}"
        );
    }
}

/// The rules engine's switches mean nothing to the spacy engine: asking
/// for them is a manifest error, and nothing runs.
#[test]
fn spacy_engine_rejects_rules_only_params() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("c.tsv"), "a dog on a bench\tu0\n");
    let m = dir.path().join("m.toml");
    write(
        &m,
        "[pipeline]\nname = \"p\"\nworkdir = \"run\"\n\n[[stage]]\nname = \"captions\"\nkind = \"ingest\"\nparams = { path = \"c.tsv\" }\n\n[[stage]]\nname = \"graphs\"\nkind = \"parse\"\ninputs = [\"captions\"]\nparams = { learned_chunks = false }\n",
    );
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("learned_chunks") && r.stderr.contains("engine = \"rules\""),
        "{}",
        r.stderr
    );
    assert!(!dir.path().join("run").join("captions").exists());
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "--set",
        "graphs.engine=\"rules\"",
    ])
    .ok();
}

/// `strict_v010 = false` on the spacy engine: the later upstream fixes on
/// top of the same parse.
#[test]
fn spacy_engine_later_upstream_fixes() {
    let caps = [
        "the dog is on the bed",
        "a man standing in front of a building",
        "ice cream cone on a white background",
        "she is playing the piano",
        "a table with cups , plates and bowls",
        "a cat is next to a dog",
    ];
    let strict = genecis::parse::spacy::parse_batch_with(&caps, true).unwrap();
    let loose = genecis::parse::spacy::parse_batch_with(&caps, false).unwrap();
    let trip = |g: &genecis::parse::SceneGraph| genecis::parse::eval::heads_and_triples(g).1;
    // Copula + PP, and a phrasal preposition after a verb: nothing in 0.1.0.
    assert!(trip(&strict[0]).is_empty() && trip(&strict[1]).is_empty());
    assert_eq!(trip(&loose[0]), vec![t("dog", "on", "bed")]);
    assert_eq!(trip(&loose[1]), vec![t("man", "in front of", "building")]);
    // Compounds recurse.
    assert_eq!(strict[2].entities[0].head, "cream cone");
    assert_eq!(loose[2].entities[0].head, "ice cream cone");
    // Pronouns are no entities.
    assert_eq!(strict[3].entities[0].head, "she");
    assert!(loose[3].entities.iter().all(|e| e.head != "she"));
    // Conjunctions recurse: 0.1.0 stops at the first conjunct.
    assert_eq!(
        trip(&strict[4]),
        vec![t("table", "with", "cups"), t("table", "with", "plates")]
    );
    assert_eq!(trip(&loose[4]).len(), 3);
    assert!(trip(&loose[4]).contains(&t("table", "with", "bowls")));
    // "is next to": "next" hangs on the copula as acomp.
    assert!(trip(&strict[5]).is_empty());
    assert_eq!(trip(&loose[5]), vec![t("cat", "next to", "dog")]);
}
