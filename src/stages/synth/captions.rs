//! CC3M-style captions written from a scene graph: varied templates,
//! synonyms, plurals, conjunctions, relations and places.

use crate::rng::Rng;

use super::world::*;

/// An object's noun phrase. Colour and pattern are sometimes said after
/// the noun ("a circle in red", "a box with stripes"), which the parser
/// reads as relations, so mining also yields attribute conditions, as
/// CC3M's "a woman in red" does.
pub(super) fn describe(o: &Object, rng: &mut Rng, plural: bool) -> String {
    let style = rng.uniform(0.0, 1.0);
    let colour_after = style < 0.3;
    let pattern_after = !colour_after && o.pattern != 0 && style < 0.55;
    let mut words: Vec<&str> = Vec::new();
    if rng.uniform(0.0, 1.0) < 0.5 {
        words.push(SIZES[o.size]);
    }
    if o.pattern != 0 && !pattern_after && rng.uniform(0.0, 1.0) < 0.7 {
        words.push(PATTERNS[o.pattern]);
    }
    // Captions leave the colour out now and then, as people do; the
    // shape then has to carry the match in contrastive pretraining.
    if !colour_after && rng.uniform(0.0, 1.0) < 0.65 {
        words.push(COLORS[o.color].0);
    }
    let noun = if rng.uniform(0.0, 1.0) < 0.2 {
        SYNONYMS[o.shape]
    } else {
        SHAPES[o.shape]
    };
    let noun = if plural {
        if noun.ends_with('x') || noun.ends_with('s') {
            format!("{noun}es")
        } else {
            format!("{noun}s")
        }
    } else {
        noun.to_string()
    };
    words.push(&noun);
    let mut body = words.join(" ");
    if colour_after {
        body = format!("{body} in {}", COLORS[o.color].0);
    } else if pattern_after {
        body = format!("{body} with {}", ["stripes", "dots"][o.pattern - 1]);
    }
    if plural {
        format!("two {body}")
    } else if body.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {body}")
    } else {
        format!("a {body}")
    }
}

pub(super) fn relation(a: &Object, b: &Object, rng: &mut Rng) -> &'static str {
    let (dx, dy) = (b.x - a.x, b.y - a.y);
    if rng.uniform(0.0, 1.0) < 0.2 {
        "with"
    } else if dx.abs() >= dy.abs() {
        ["next to", "beside", "near"][pick(rng, 3)]
    } else if dy > 0.0 {
        "above"
    } else {
        "below"
    }
}

/// The place, said in 60% of captions (" on sand"), else "".
pub(super) fn place_phrase(background: usize, rng: &mut Rng) -> String {
    let places = BACKGROUNDS[background].1;
    let said = places[pick(rng, places.len())];
    if rng.uniform(0.0, 1.0) < 0.6 {
        format!(" {said}")
    } else {
        String::new()
    }
}

/// A close-up's caption: its object, sometimes its place.
pub(super) fn closeup_caption(s: &Scene, rng: &mut Rng) -> String {
    let d = describe(&s.objects[0], rng, false);
    format!("{d}{}", place_phrase(s.background, rng))
}

/// A caption from the scene graph, in one of several phrasings.
pub(crate) fn caption(s: &Scene, rng: &mut Rng) -> String {
    // Identical pairs are said once, in the plural.
    let mut groups: Vec<(Object, bool)> = Vec::new();
    for o in &s.objects {
        match groups.iter_mut().find(|(g, _)| g.shape == o.shape) {
            Some(g) => g.1 = true,
            None => groups.push((*o, false)),
        }
    }
    let descs: Vec<String> = groups.iter().map(|(o, p)| describe(o, rng, *p)).collect();
    let place = place_phrase(s.background, rng);
    let text = match descs.len() {
        1 => format!("{}{place}", descs[0]),
        2 if rng.uniform(0.0, 1.0) < 0.3 => format!("{} and {}{place}", descs[0], descs[1]),
        2 => format!(
            "{} {} {}{place}",
            descs[0],
            relation(&groups[0].0, &groups[1].0, rng),
            descs[1]
        ),
        _ => {
            let rel = relation(&groups[0].0, &groups[1].0, rng);
            let rest: Vec<&str> = descs[2..].iter().map(String::as_str).collect();
            format!(
                "{} {rel} {} and {}{place}",
                descs[0],
                descs[1],
                rest.join(" and ")
            )
        }
    };
    text
}
