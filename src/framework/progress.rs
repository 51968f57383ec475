//! Progress bars for long work. Hidden when stderr is not a terminal or when
//! the run is quiet, so logs and tests stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    visible: bool,
}

impl Progress {
    pub(crate) fn new(visible: bool) -> Progress {
        Progress { visible }
    }

    /// A bar counting `unit`s up to `total`.
    pub(crate) fn bar(&self, label: &str, total: u64, unit: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if self.visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        let template = format!(
            "{{prefix}} [{{bar:32}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}"
        );
        bar.set_style(
            ProgressStyle::with_template(&template)
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    }
}

/// `12345678` -> `12,345,678`.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
