//! The score report: a Markdown table, the same table as text for the run
//! summary, and a grouped bar chart of R@1 as PNG. The chart is drawn
//! pixel by pixel with a built-in 5x7 font, so it needs no system fonts and
//! is byte-identical on every machine.

use image::{Rgb, RgbImage};

use crate::eval::Recall;

/// Tasks in row order, methods in column order, as first seen.
fn axes(rs: &[Recall]) -> (Vec<&str>, Vec<&'static str>) {
    let mut tasks: Vec<&str> = Vec::new();
    let mut methods: Vec<&'static str> = Vec::new();
    for r in rs {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
        if !methods.contains(&r.method) {
            methods.push(r.method);
        }
    }
    (tasks, methods)
}

fn find<'a>(rs: &'a [Recall], task: &str, method: &str) -> Option<&'a Recall> {
    rs.iter().find(|r| r.task == task && r.method == method)
}

/// The K shown for a task.
fn ks(rs: &[Recall], task: &str) -> [usize; 3] {
    rs.iter()
        .find(|r| r.task == task)
        .map(|r| r.shown().map(|(k, _)| k))
        .unwrap_or([1, 2, 3])
}

pub(crate) fn markdown(title: &str, rs: &[Recall], paired: &[crate::eval::PairedRow]) -> String {
    let (tasks, methods) = axes(rs);
    let mut s = format!("# {title}\n\nRecall@K (%) per task: GeneCIS tasks at K = 1, 2, 3 (the target is candidate 0 of each template's 15); global tasks (CIRR, MIT-States) at K = 1, 5, 10 over the whole gallery, the reference left out.\n\n");
    s.push_str("| method |");
    for t in &tasks {
        let [a, b, c] = ks(rs, t);
        s.push_str(&format!(" {t} R@{a} | R@{b} | R@{c} |"));
    }
    s.push('\n');
    s.push_str("|---|");
    for _ in &tasks {
        s.push_str("---:|---:|---:|");
    }
    s.push('\n');
    for m in &methods {
        s.push_str(&format!("| {m} |"));
        for t in &tasks {
            match find(rs, t, m) {
                Some(r) => {
                    for (i, (_, v)) in r.shown().into_iter().enumerate() {
                        // The interval where it is the K the row shows.
                        let (lo, hi) = if r.global && i > 0 {
                            (f64::NAN, f64::NAN)
                        } else {
                            r.ci[i]
                        };
                        if lo.is_finite() {
                            s.push_str(&format!(
                                " {:.1} ({:.1}–{:.1}) |",
                                100.0 * v,
                                100.0 * lo,
                                100.0 * hi
                            ));
                        } else {
                            s.push_str(&format!(" {:.1} |", 100.0 * v));
                        }
                    }
                }
                None => s.push_str(" | | |"),
            }
        }
        s.push('\n');
    }
    s.push_str("\n| task | templates |\n|---|---:|\n");
    for t in &tasks {
        if let Some(r) = rs.iter().find(|r| r.task == *t) {
            s.push_str(&format!("| {t} | {} |\n", r.n));
        }
    }
    if !paired.is_empty() {
        s.push_str("\nIn brackets: 95% percentile-bootstrap intervals over the task's templates (the average resampled within each task).\n\n## Paired differences in R@1\n\nMethod a minus method b on the same templates: the paired bootstrap's 95% interval and McNemar's exact test; * marks p < 0.05.\n\n| task | a | b | Δ R@1 | 95% interval | p | |\n|---|---|---|---:|---:|---:|---|\n");
        for r in paired {
            s.push_str(&format!(
                "| {} | {} | {} | {:+.1} | {:+.1} to {:+.1} | {:.3} | {} |\n",
                r.task,
                r.a,
                r.b,
                100.0 * r.p.delta,
                100.0 * r.p.lo,
                100.0 * r.p.hi,
                r.p.p_value,
                if r.p.p_value < 0.05 { "*" } else { "" }
            ));
        }
    }
    s.push_str("\n![R@1 by task and method](results.png)\n");
    s
}

/// Aligned text table (R@1/R@2/R@3 in %) for the terminal.
pub(crate) fn text_table(rs: &[Recall]) -> String {
    let (tasks, methods) = axes(rs);
    let w = methods.iter().map(|m| m.len()).max().unwrap_or(6).max(6);
    let tw = tasks.iter().map(|t| t.len()).max().unwrap_or(4).max(17);
    let mut s = format!("{:<w$}", "method");
    for t in &tasks {
        s.push_str(&format!("  {t:>tw$}"));
    }
    s.push('\n');
    s.push_str(&format!("{:<w$}", ""));
    for t in &tasks {
        let [a, b, c] = ks(rs, t);
        let head = format!("R@{a} / R@{b} / R@{c}");
        s.push_str(&format!("  {head:>tw$}"));
    }
    s.push('\n');
    for m in &methods {
        s.push_str(&format!("{m:<w$}"));
        for t in &tasks {
            let cell = find(rs, t, m)
                .map(|r| {
                    let [(_, a), (_, b), (_, c)] = r.shown();
                    format!("{:.1} / {:.1} / {:.1}", 100.0 * a, 100.0 * b, 100.0 * c)
                })
                .unwrap_or_default();
            s.push_str(&format!("  {cell:>tw$}"));
        }
        s.push('\n');
    }
    s.push_str(&format!("{:w$}  (recall, %)", ""));
    s
}

const COLORS: [[u8; 3]; 6] = [
    [76, 114, 176],
    [221, 132, 82],
    [85, 168, 104],
    [196, 78, 82],
    [129, 114, 179],
    [147, 120, 96],
];

/// Grouped bars of R@1: one group per task, one bar per method.
pub(crate) fn chart_png(title: &str, rs: &[Recall]) -> Result<Vec<u8>, String> {
    let (tasks, methods) = axes(rs);
    let (w, h) = (960u32, 540u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (70i64, 20i64, 60i64, 90i64);
    let plot_h = h as i64 - top - bottom;
    let plot_w = w as i64 - left - right;
    // The axis holds the bars and their intervals' tops.
    let max = rs
        .iter()
        .map(|r| {
            r.at[0].max(if r.ci[0].1.is_finite() {
                r.ci[0].1
            } else {
                0.0
            })
        })
        .fold(0.0f64, f64::max);
    // Axis top: the next 10% step above the best bar.
    let ymax = ((max * 10.0).floor() + 1.0).min(10.0) / 10.0;
    let y_of = |v: f64| top + plot_h - (v / ymax * plot_h as f64).round() as i64;

    text(&mut img, left, 18, title, 2, [0, 0, 0]);
    let grid = [225, 225, 225];
    // Five grid steps up to ymax.
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = y_of(v);
        rect(
            &mut img,
            left,
            y,
            plot_w,
            1,
            if i == 0 { [0, 0, 0] } else { grid },
        );
        let label = format!("{}", (v * 100.0).round());
        text(
            &mut img,
            left - 8 - 12 * label.len() as i64,
            y - 7,
            &label,
            2,
            [60, 60, 60],
        );
    }
    text(&mut img, left + 6, top - 22, "R@1 (%)", 2, [60, 60, 60]);
    rect(&mut img, left, top, 1, plot_h, [0, 0, 0]);

    let groups = tasks.len().max(1) as i64;
    let group_w = plot_w / groups;
    let bar_w = ((group_w - 20) / methods.len().max(1) as i64).max(2);
    for (gi, t) in tasks.iter().enumerate() {
        let gx = left + gi as i64 * group_w + 10;
        for (mi, m) in methods.iter().enumerate() {
            if let Some(r) = find(rs, t, m) {
                let x = gx + mi as i64 * bar_w;
                let y = y_of(r.at[0]);
                rect(
                    &mut img,
                    x + 1,
                    y,
                    bar_w - 2,
                    top + plot_h - y,
                    COLORS[mi % COLORS.len()],
                );
                // The 95% interval as an error bar: a line with caps.
                let (lo, hi) = r.ci[0];
                let y = if lo.is_finite() && hi.is_finite() {
                    let (ylo, yhi) = (y_of(lo), y_of(hi));
                    let cx = x + bar_w / 2;
                    let cap = (bar_w / 4).max(2);
                    let ink = [30, 30, 30];
                    rect(&mut img, cx, yhi, 1, (ylo - yhi).max(1), ink);
                    rect(&mut img, cx - cap / 2, yhi, cap, 1, ink);
                    rect(&mut img, cx - cap / 2, ylo, cap, 1, ink);
                    y.min(yhi)
                } else {
                    y
                };
                let label = format!("{:.1}", 100.0 * r.at[0]);
                let sc = if 12 * label.len() as i64 <= bar_w {
                    2
                } else {
                    1
                };
                let lw = 6 * sc * label.len() as i64;
                text(
                    &mut img,
                    x + (bar_w - lw) / 2,
                    y - 8 * sc - 2,
                    &label,
                    sc as u32,
                    [40, 40, 40],
                );
            }
        }
        let tw = 12 * t.len() as i64;
        let scale = if tw <= group_w { 2 } else { 1 };
        let tw = 6 * scale * t.len() as i64;
        text(
            &mut img,
            gx - 10 + (group_w - tw) / 2,
            top + plot_h + 10,
            t,
            scale as u32,
            [0, 0, 0],
        );
    }
    // Legend.
    let mut lx = left;
    let ly = h as i64 - 36;
    for (mi, m) in methods.iter().enumerate() {
        rect(&mut img, lx, ly, 16, 16, COLORS[mi % COLORS.len()]);
        text(&mut img, lx + 22, ly + 1, m, 2, [0, 0, 0]);
        lx += 22 + 12 * m.len() as i64 + 30;
    }
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the chart: {e}"))?;
    Ok(out)
}

fn rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    for yy in y.max(0)..(y + h).min(ih) {
        for xx in x.max(0)..(x + w).min(iw) {
            img.put_pixel(xx as u32, yy as u32, Rgb(c));
        }
    }
}

/// Draws `s` with the 5x7 font, each font pixel `scale` pixels wide, one
/// blank column between glyphs.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: u32, c: [u8; 3]) {
    let sc = scale as i64;
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        let gx = x + i as i64 * 6 * sc;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0b10000 >> col) != 0 {
                    rect(img, gx + col * sc, y + row as i64 * sc, sc, sc, c);
                }
            }
        }
    }
}

/// 5x7 glyphs, one byte per row, bit 4 = leftmost column. Lower case is
/// drawn as upper case; unknown characters as '?'.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [
            0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'B' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110,
        ],
        'C' => [
            0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110,
        ],
        'D' => [
            0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100,
        ],
        'E' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111,
        ],
        'F' => [
            0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'G' => [
            0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111,
        ],
        'H' => [
            0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001,
        ],
        'I' => [
            0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        'J' => [
            0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100,
        ],
        'K' => [
            0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001,
        ],
        'L' => [
            0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
        ],
        'M' => [
            0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001,
        ],
        'N' => [
            0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001,
        ],
        'O' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'P' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000,
        ],
        'Q' => [
            0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101,
        ],
        'R' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
        ],
        'S' => [
            0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110,
        ],
        'T' => [
            0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100,
        ],
        'U' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110,
        ],
        'V' => [
            0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100,
        ],
        'W' => [
            0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010,
        ],
        'X' => [
            0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001,
        ],
        'Y' => [
            0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100,
        ],
        'Z' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111,
        ],
        '0' => [
            0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
        ],
        '1' => [
            0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        '2' => [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
        '3' => [
            0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
        ],
        '4' => [
            0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
        ],
        '5' => [
            0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
        ],
        '6' => [
            0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
        ],
        '7' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
        ],
        '8' => [
            0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
        ],
        '9' => [
            0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
        ],
        '.' => [0, 0, 0, 0, 0, 0b01100, 0b01100],
        ',' => [0, 0, 0, 0, 0b01100, 0b00100, 0b01000],
        ':' => [0, 0b01100, 0b01100, 0, 0b01100, 0b01100, 0],
        '-' => [0, 0, 0, 0b11111, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0b11111],
        '/' => [0, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0],
        '%' => [
            0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011,
        ],
        '@' => [
            0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110,
        ],
        '(' => [
            0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010,
        ],
        ')' => [
            0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000,
        ],
        '+' => [0, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0],
        '=' => [0, 0, 0b11111, 0, 0b11111, 0, 0],
        ' ' => [0; 7],
        _ => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0, 0b00100],
    }
}
