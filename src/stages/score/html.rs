//! `report.html`: a static page (plus `thumbs/`) that works from file://
//! offline. A summary (results, chart, recall by condition, the audit,
//! provenance), then every template as a card per method, with filters,
//! pagination and a two-method comparison; the cards are drawn by a small
//! script from JSON embedded in the page.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use image::{Rgb, RgbImage};
use rayon::prelude::*;

use crate::eval::audit::AuditRow;
use crate::eval::Recall;
use crate::model::preprocess::{crop_pad_square, open, to_rgb_image, vaw_crop_box};
use crate::tables::image_keys::KeyRow;

/// Thumbnails are at most this many pixels on their long side.
pub(crate) const THUMB: u32 = 96;

/// A method's outcome on one template: the target's rank and the top keys
/// with their similarity.
pub(crate) type Outcome = (u32, Vec<(String, f32)>);

/// A key's thumbnail file and, where made, its full-size copy.
type Thumb = (String, Option<String>);

/// One template and what each method retrieved.
pub(crate) struct Card {
    pub task: String,
    pub id: u32,
    pub condition: String,
    pub reference: String,
    pub target: String,
    /// Per method, in `methods` order: (rank, top keys with similarity).
    pub outcomes: Vec<Option<Outcome>>,
}

/// One `recall_by_condition` row.
pub(crate) struct ConditionRecall {
    pub task: String,
    pub method: &'static str,
    pub condition: String,
    pub n: u64,
    pub at: [f64; 3],
}

pub(crate) struct Page<'a> {
    pub title: &'a str,
    pub recalls: &'a [Recall],
    pub methods: Vec<&'static str>,
    pub cards: Vec<Card>,
    pub by_condition: &'a [ConditionRecall],
    pub audit: &'a [AuditRow],
    /// Paired differences in R@1 between methods, with their tests.
    pub paired: &'a [crate::eval::PairedRow],
    pub provenance: Vec<(String, String)>,
    pub manifest_text: String,
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn shrink(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = THUMB as f64 / w.max(h) as f64;
    if s >= 1.0 {
        return img.clone();
    }
    let (nw, nh) = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
}

fn jpeg_bytes(img: &RgbImage) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82)
        .encode_image(img)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The key's pixels as the embed stage read them (VAW: the padded crop),
/// and for a VAW key also the whole image with the crop box drawn.
fn thumbnails(k: &KeyRow) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let img = open(&k.path)?;
    let Some(b) = k.bbox else {
        return Ok((jpeg_bytes(&shrink(&to_rgb_image(img)))?, None));
    };
    let bx = vaw_crop_box(b, img.width, img.height);
    let crop = to_rgb_image(crop_pad_square(&img, bx));
    let mut full = shrink(&to_rgb_image(img.clone()));
    let s = full.width() as f64 / img.width as f64;
    let red = Rgb([230, 30, 30]);
    let (x0, y0) = ((bx.0 as f64 * s) as i64, (bx.1 as f64 * s) as i64);
    let (x1, y1) = ((bx.2 as f64 * s) as i64 - 1, (bx.3 as f64 * s) as i64 - 1);
    let (w, h) = (full.width() as i64, full.height() as i64);
    let mut put = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            full.put_pixel(x as u32, y as u32, red);
        }
    };
    for x in x0..=x1 {
        put(x, y0);
        put(x, y1);
    }
    for y in y0..=y1 {
        put(x0, y);
        put(x1, y);
    }
    Ok((jpeg_bytes(&shrink(&crop))?, Some(jpeg_bytes(&full)?)))
}

/// Writes one thumbnail per key under `dir/thumbs/` (in parallel); returns
/// key -> (thumbnail, whole-image-with-box) relative paths. Keys whose
/// file cannot be read get none (the page says so).
pub(crate) fn write_thumbnails(
    dir: &Path,
    keys: &[&str],
    rows: &HashMap<String, KeyRow>,
) -> Result<HashMap<String, Thumb>, String> {
    let tdir = dir.join("thumbs");
    std::fs::create_dir_all(&tdir).map_err(|e| format!("{}: {e}", tdir.display()))?;
    let made: Vec<Option<(String, Thumb)>> = keys
        .par_iter()
        .map(|k| {
            let row = rows.get(*k)?;
            let (t, full) = thumbnails(row).ok()?;
            let name = blake3::hash(k.as_bytes()).to_hex()[..16].to_string();
            std::fs::write(tdir.join(format!("{name}.jpg")), t).ok()?;
            let full = match full {
                Some(f) => {
                    std::fs::write(tdir.join(format!("{name}-box.jpg")), f).ok()?;
                    Some(format!("thumbs/{name}-box.jpg"))
                }
                None => None,
            };
            Some((k.to_string(), (format!("thumbs/{name}.jpg"), full)))
        })
        .collect();
    Ok(made.into_iter().flatten().collect())
}

/// The paired differences, significant ones (p < 0.05) marked.
fn paired_table(p: &Page) -> String {
    if p.paired.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "<h3>Paired differences in R@1</h3><p class=\"legend\">a minus b on the same templates: the paired bootstrap's 95% interval and McNemar's exact test; <b>*</b> marks p &lt; 0.05.</p><table class=\"res\" id=\"paired\"><tr><th>task</th><th>a</th><th>b</th><th>&Delta; R@1</th><th>95% interval</th><th>p</th><th></th></tr>",
    );
    for r in p.paired {
        let sig = r.p.p_value < 0.05;
        s.push_str(&format!(
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{:+.1}</td><td>{:+.1} to {:+.1}</td><td>{:.3}</td><td>{}</td></tr>",
            if sig { " class=\"sig\"" } else { "" },
            esc(&r.task),
            esc(r.a),
            esc(r.b),
            100.0 * r.p.delta,
            100.0 * r.p.lo,
            100.0 * r.p.hi,
            r.p.p_value,
            if sig { "*" } else { "" }
        ));
    }
    s.push_str("</table>");
    s
}

fn results_table(p: &Page) -> String {
    let mut tasks: Vec<&str> = Vec::new();
    for r in p.recalls {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
    }
    let mut s = String::from("<table class=\"res\"><tr><th>task</th><th>K</th>");
    for m in &p.methods {
        s.push_str(&format!("<th>{}</th>", esc(m)));
    }
    s.push_str("</tr>");
    for t in tasks {
        let rs: Vec<Option<&Recall>> = p
            .methods
            .iter()
            .map(|m| p.recalls.iter().find(|r| r.task == t && r.method == *m))
            .collect();
        let Some(first) = rs.iter().flatten().next() else {
            continue;
        };
        for (i, (k, _)) in first.shown().iter().enumerate() {
            s.push_str(&format!(
                "<tr><td>{}</td><td>R@{k}</td>",
                if i == 0 { esc(t) } else { String::new() }
            ));
            let vals: Vec<Option<f64>> = rs.iter().map(|r| r.map(|r| r.shown()[i].1)).collect();
            let best = vals.iter().flatten().cloned().fold(f64::MIN, f64::max);
            for (v, r) in vals.into_iter().zip(&rs) {
                // The 95% interval where it is of the K shown.
                let ci = r
                    .filter(|r| !(r.global && i > 0))
                    .map(|r| r.ci[i])
                    .filter(|c| c.0.is_finite());
                let ci = ci
                    .map(|(lo, hi)| {
                        format!(
                            " <small class=\"ci\">{:.1}–{:.1}</small>",
                            100.0 * lo,
                            100.0 * hi
                        )
                    })
                    .unwrap_or_default();
                match v {
                    Some(v) => s.push_str(&format!(
                        "<td{}>{:.1}{ci}</td>",
                        if v == best { " class=\"best\"" } else { "" },
                        100.0 * v
                    )),
                    None => s.push_str("<td>-</td>"),
                }
            }
            s.push_str("</tr>");
        }
    }
    s.push_str("</table>");
    s
}

/// Grouped bars: R@1 per method for each task's most frequent conditions.
fn condition_chart(p: &Page) -> String {
    const COLORS: [&str; 6] = [
        "#4878d0", "#ee854a", "#6acc64", "#d65f5f", "#956cb4", "#8c613c",
    ];
    let mut by_task: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for r in p.by_condition {
        let e = by_task.entry(&r.task).or_default();
        let n = e.entry(&r.condition).or_default();
        *n = (*n).max(r.n);
    }
    let mut s = String::new();
    for (task, conds) in by_task {
        let mut top: Vec<(&str, u64)> = conds.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        top.truncate(8);
        let nm = p.methods.len().max(1);
        let group = 14 * nm + 16;
        let width = 160 + group * top.len();
        s.push_str(&format!(
            "<h4>{} (R@1 by condition, the {} most frequent)</h4><svg width=\"{width}\" height=\"170\" role=\"img\">",
            esc(task),
            top.len()
        ));
        for i in 0..=4 {
            let y = 130 - i * 25;
            s.push_str(&format!(
                "<line x1=\"40\" x2=\"{width}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"4\" y=\"{}\" font-size=\"10\">{}%</text>",
                y + 3,
                i * 25
            ));
        }
        for (gi, (cond, n)) in top.iter().enumerate() {
            let x0 = 44 + gi * group;
            for (mi, m) in p.methods.iter().enumerate() {
                if let Some(r) = p
                    .by_condition
                    .iter()
                    .find(|r| r.task == task && r.condition == *cond && r.method == *m)
                {
                    let h = (r.at[0] * 100.0).round() as usize;
                    s.push_str(&format!(
                        "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"{h}\" fill=\"{}\"><title>{} {}: R@1 {:.1}% (n = {})</title></rect>",
                        x0 + mi * 14,
                        130 - h,
                        COLORS[mi % COLORS.len()],
                        esc(m),
                        esc(cond),
                        100.0 * r.at[0],
                        r.n
                    ));
                }
            }
            let label: String = cond.chars().take(14).collect();
            s.push_str(&format!(
                "<text x=\"{x0}\" y=\"146\" font-size=\"10\">{}</text><text x=\"{x0}\" y=\"158\" font-size=\"9\" fill=\"#777\">n={n}</text>",
                esc(&label)
            ));
        }
        s.push_str("</svg>");
    }
    let legend: Vec<String> = p
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "<span style=\"color:{}\">&#9632;</span> {}",
                COLORS[i % COLORS.len()],
                esc(m)
            )
        })
        .collect();
    format!("<p class=\"legend\">{}</p>{s}", legend.join(" &nbsp; "))
}

fn audit_section(p: &Page) -> String {
    let mut s = String::from("<table class=\"res\"><tr><th>check</th><th>templates</th></tr>");
    for (c, n) in crate::eval::audit::counts(p.audit) {
        s.push_str(&format!("<tr><td>{c}</td><td>{n}</td></tr>"));
    }
    s.push_str("</table>");
    if !p.audit.is_empty() {
        s.push_str("<details><summary>flagged templates (first 200)</summary><ul class=\"audit\">");
        for r in p.audit.iter().take(200) {
            s.push_str(&format!(
                "<li>{} #{}: <b>{}</b> {}</li>",
                esc(&r.task),
                r.template_id,
                r.check,
                esc(&r.detail)
            ));
        }
        s.push_str("</ul></details>");
    }
    s
}

/// The page's data: keys once, cards by key index.
fn data_json(p: &Page, thumbs: &HashMap<String, (String, Option<String>)>) -> String {
    let mut keys: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut id = |k: &str| -> usize {
        if let Some(&i) = index.get(k) {
            return i;
        }
        keys.push(k.to_string());
        index.insert(k.to_string(), keys.len() - 1);
        keys.len() - 1
    };
    let mut tasks: Vec<&str> = Vec::new();
    let mut cards = Vec::new();
    for c in &p.cards {
        let t = match tasks.iter().position(|t| *t == c.task) {
            Some(i) => i,
            None => {
                tasks.push(&c.task);
                tasks.len() - 1
            }
        };
        let outcomes: Vec<serde_json::Value> = c
            .outcomes
            .iter()
            .map(|o| match o {
                Some((rank, top)) => serde_json::json!([
                    rank,
                    top.iter().map(|(k, _)| id(k)).collect::<Vec<_>>(),
                    top.iter()
                        .map(|(_, s)| (s * 1e4).round() / 1e4)
                        .collect::<Vec<_>>()
                ]),
                None => serde_json::Value::Null,
            })
            .collect();
        cards.push(serde_json::json!({
            "t": t, "id": c.id, "c": c.condition, "r": id(&c.reference), "g": id(&c.target), "m": outcomes
        }));
    }
    let thumb: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| match thumbs.get(k) {
            Some((t, f)) => serde_json::json!([t, f]),
            None => serde_json::Value::Null,
        })
        .collect();
    let v = serde_json::json!({
        "keys": keys, "thumbs": thumb, "tasks": tasks, "methods": p.methods, "cards": cards
    });
    // Every `<` (and `>`, `&`) as a JSON escape: inside <script> the HTML
    // parser ends the block at `</script` and enters a comment state at
    // `<!--`, whatever JSON's quotes say; escaped, neither can occur.
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

pub(crate) fn render(p: &Page, thumbs: &HashMap<String, (String, Option<String>)>) -> String {
    let prov: String = p
        .provenance
        .iter()
        .map(|(k, v)| {
            format!(
                "<tr><td>{}</td><td><code>{}</code></td></tr>",
                esc(k),
                esc(v)
            )
        })
        .collect();
    let mut html = String::with_capacity(1 << 20);
    html.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>");
    html.push_str(&esc(p.title));
    html.push_str("</title><style>");
    html.push_str(STYLE);
    html.push_str("</style></head><body data-loaded=\"0\" data-broken=\"0\"><h1>");
    html.push_str(&esc(p.title));
    html.push_str("</h1><nav><a href=\"#view=cards\">summary and templates</a> · <a href=\"#view=cards&summary=0\">templates only</a> · <a href=\"#view=compare&summary=0\">compare two methods</a> · <a href=\"report.md\">report.md</a></nav>");
    html.push_str("<section id=\"summary\"><h2>Results (%)</h2>");
    html.push_str(&results_table(p));
    html.push_str(&paired_table(p));
    html.push_str("<p><img src=\"results.png\" alt=\"results chart\" class=\"chart\"></p><h2>Recall by condition</h2>");
    html.push_str(&condition_chart(p));
    html.push_str("<h2>Audit</h2>");
    html.push_str(&audit_section(p));
    html.push_str("<h2>Provenance</h2><table class=\"res\">");
    html.push_str(&prov);
    html.push_str("</table><details><summary>manifest</summary><pre>");
    html.push_str(&esc(&p.manifest_text));
    html.push_str("</pre></details></section><section id=\"browse\"><h2 id=\"browse-title\">Templates</h2><div id=\"controls\"></div><div id=\"stats\"></div><div id=\"cards\"></div><div id=\"pager\"></div></section>");
    html.push_str("<script type=\"application/json\" id=\"data\">");
    html.push_str(&data_json(p, thumbs));
    html.push_str("</script><script>");
    html.push_str(SCRIPT);
    html.push_str("</script></body></html>\n");
    html
}

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table.res{border-collapse:collapse;margin:.5em 0}table.res td,table.res th{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.res td:first-child{text-align:left}td.best{font-weight:bold;background:#eef6ee}
img.chart{max-width:100%}#controls label{margin-right:1em}
#cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;width:530px;font-size:12px}
.card.hit{border-color:#3a3}.card.miss{border-color:#c33}
.card .row{display:flex;gap:6px;align-items:flex-start}.card figure{margin:0;text-align:center;width:98px}
.card img{width:96px;height:96px;object-fit:contain;background:#eee;display:block}
.card figure.target img{outline:3px solid #3a3}.badge{font-weight:bold}.hit .badge{color:#3a3}.miss .badge{color:#c33}
.cond{font-size:14px;font-weight:bold;margin:2px 0 6px}.muted{color:#777}
#pager button{margin:2px}.legend{font-size:12px}ul.audit{font-size:12px}
"#;

const SCRIPT: &str = r#"
(function(){
const D=JSON.parse(document.getElementById('data').textContent);
const P=48;
function q(){const o={};location.hash.slice(1).split('&').forEach(kv=>{if(!kv)return;const i=kv.indexOf('=');o[decodeURIComponent(i<0?kv:kv.slice(0,i))]=i<0?'':decodeURIComponent(kv.slice(i+1));});return o;}
function setq(o){location.hash=Object.entries(o).filter(([k,v])=>v!==''&&v!==undefined).map(([k,v])=>encodeURIComponent(k)+'='+encodeURIComponent(v)).join('&');}
function mi(name,def){const i=D.methods.indexOf(name);return i<0?def:i;}
function sel(id,label,opts,val){return '<label>'+label+' <select id="'+id+'">'+opts.map(o=>'<option value="'+esc(o[0])+'"'+(String(o[0])===String(val)?' selected':'')+'>'+esc(o[1])+'</option>').join('')+'</select></label>';}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
let loaded=0,broken=0;
function img(k,full,eager,cls,cap){const t=D.thumbs[k];const src=t?(full&&t[1]?t[1]:t[0]):null;
 const im=src?'<img src="'+src+'"'+(eager?'':' loading="lazy"')+' alt="'+esc(D.keys[k])+'" title="'+esc(D.keys[k])+'">':'<div class="muted" style="width:96px;height:96px">no image</div>';
 return '<figure'+(cls?' class="'+cls+'"':'')+'>'+im+'<figcaption>'+cap+'</figcaption></figure>';}
function card(c,m,eager,extra){const o=c.m[m];if(!o)return '';const hit=o[0]===1;
 let h='<div class="card '+(hit?'hit':'miss')+'" data-task="'+esc(D.tasks[c.t])+'" data-id="'+c.id+'"><div>'+esc(D.tasks[c.t])+' #'+c.id+' · '+esc(D.methods[m])+' · <span class="badge">'+(hit?'hit':'miss')+'</span> (target rank '+o[0]+')'+(extra||'')+'</div><div class="cond">'+esc(c.c)+'</div><div class="row">';
 h+=img(c.r,true,eager,'','reference');
 o[1].forEach((k,i)=>{h+=img(k,false,eager,k===c.g?'target':'','#'+(i+1)+' '+o[2][i].toFixed(3));});
 h+=img(c.g,false,eager,'target','target');
 return h+'</div></div>';}
function render(){const s=q();const view=s.view||'cards';const eager=s.eager==='1';
 document.getElementById('summary').style.display=s.summary==='0'?'none':'';
 const task=s.task||'';const m=mi(s.method,Math.max(0,D.methods.indexOf('combiner')));
 let ctl=sel('f-task','task',[['','all']].concat(D.tasks.map(t=>[t,t])),task);
 let cards=D.cards.filter(c=>(!task||D.tasks[c.t]===task)&&(!s.cond||c.c.toLowerCase().includes(s.cond.toLowerCase())));
 let html='',stats='';
 if(view==='compare'){const a=mi(s.a,Math.max(0,D.methods.indexOf('combiner')));const b=mi(s.b,Math.max(0,D.methods.indexOf('image_plus_text')));const side=s.side||'wins';
  ctl+=sel('f-a','method A',D.methods.map((x,i)=>[x,x]),D.methods[a])+sel('f-b','method B',D.methods.map((x,i)=>[x,x]),D.methods[b])+sel('f-side','show',[['wins','A hits, B misses'],['losses','A misses, B hits']],side);
  const both=cards.filter(c=>c.m[a]&&c.m[b]);const win=both.filter(c=>c.m[a][0]===1&&c.m[b][0]!==1);const loss=both.filter(c=>c.m[a][0]!==1&&c.m[b][0]===1);
  stats=esc(D.methods[a])+' vs '+esc(D.methods[b])+' at R@1 over '+both.length+' templates: <b id="wins">'+win.length+'</b> wins, <b id="losses">'+loss.length+'</b> losses, '+(both.length-win.length-loss.length)+' ties.';
  cards=side==='wins'?win:loss;
  const page=Math.min(+s.page||0,Math.max(0,Math.ceil(cards.length/P)-1));
  html=cards.slice(page*P,page*P+P).map(c=>'<div class="row">'+card(c,a,eager)+card(c,b,eager)+'</div>').join('');
  pager(cards.length,page);
 } else {
  ctl+=sel('f-method','method',D.methods.map(x=>[x,x]),D.methods[m])+sel('f-outcome','outcome',[['','all'],['hit','hit (R@1)'],['miss','miss']],s.outcome||'');
  cards=cards.filter(c=>c.m[m]&&(!s.outcome||(s.outcome==='hit')===(c.m[m][0]===1)));
  const hits=cards.filter(c=>c.m[m][0]===1).length;
  stats=cards.length+' templates, '+hits+' hits at R@1';
  const page=Math.min(+s.page||0,Math.max(0,Math.ceil(cards.length/P)-1));
  html=cards.slice(page*P,page*P+P).map(c=>card(c,m,eager)).join('');
  pager(cards.length,page);
 }
 ctl+='<label>condition <input id="f-cond" value="'+esc(s.cond||'')+'" size="12"></label>';
 document.getElementById('browse-title').textContent=view==='compare'?'Compare two methods':'Templates';
 document.getElementById('controls').innerHTML=ctl;document.getElementById('stats').innerHTML=stats;
 const box=document.getElementById('cards');box.innerHTML=html;box.dataset.count=box.querySelectorAll('.card').length;
 box.querySelectorAll('img').forEach(im=>{im.addEventListener('load',()=>{document.body.dataset.loaded=++loaded;});im.addEventListener('error',()=>{document.body.dataset.broken=++broken;});});
 const upd=(k,v)=>{const o=q();o[k]=v;o.page='';setq(o);};
 [['f-task','task'],['f-method','method'],['f-outcome','outcome'],['f-a','a'],['f-b','b'],['f-side','side']].forEach(([id,k])=>{const e=document.getElementById(id);if(e)e.onchange=()=>upd(k,e.value);});
 const cf=document.getElementById('f-cond');cf.onchange=()=>upd('cond',cf.value);}
function pager(n,page){const pages=Math.ceil(n/P);let h='';if(pages>1){for(let i=0;i<pages;i++)h+='<button data-p="'+i+'"'+(i===page?' disabled':'')+'>'+(i+1)+'</button>';}
 const el=document.getElementById('pager');el.innerHTML=h;el.querySelectorAll('button').forEach(b=>b.onclick=()=>{const o=q();o.page=b.dataset.p;setq(o);});}
window.addEventListener('hashchange',render);render();
})();
"#;
