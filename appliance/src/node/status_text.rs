//! The plain-text staff view: `comatching-appliance status` for people and `status --watch`,
//! the view the appliance image runs on tty1. Pure: a [`View`] in, lines out.
//!
//! Fits the Linux console's 80×25: at most 80 columns (values wrap under their column,
//! measured in display width so Hangul counts double) and about 20 lines. Colour (the verdict
//! line's background) only when asked for — the CLI asks when stdout is a terminal and
//! `NO_COLOR` is unset — and the words say the same without it.

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::view::{VerdictText, View};

/// How the text is laid out.
#[derive(Clone, Copy, Debug)]
pub struct TextOptions {
    /// Columns available (80 on the console).
    pub width: usize,
    /// ANSI colour for the verdict line.
    pub color: bool,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            width: 80,
            color: false,
        }
    }
}

/// The whole view: heading, verdict and action, facts, the refresh note when `footer` is given.
pub fn render(v: &View, heading: &str, footer: Option<&str>, opts: TextOptions) -> Vec<String> {
    let mut lines = head(heading, &v.verdict, opts);
    let label_w = v
        .facts
        .iter()
        .map(|f| f.label.width())
        .max()
        .unwrap_or(0)
        .min(opts.width / 2);
    for f in &v.facts {
        let value_w = opts.width.saturating_sub(label_w + 2).max(10);
        let mut wrapped = wrap(&f.value, value_w).into_iter();
        let first = wrapped.next().unwrap_or_default();
        let pad = label_w.saturating_sub(f.label.width());
        lines.push(format!("{}{}  {first}", f.label, " ".repeat(pad)));
        for more in wrapped {
            lines.push(format!("{}  {more}", " ".repeat(label_w)));
        }
    }
    if let Some(note) = footer {
        lines.push(String::new());
        lines.extend(wrap(note, opts.width));
    }
    lines
}

/// The view when the appliance does not answer: the verdict and the error, no facts.
pub fn render_no_answer(
    verdict: &VerdictText,
    heading: &str,
    error: &str,
    footer: Option<&str>,
    opts: TextOptions,
) -> Vec<String> {
    let mut lines = head(heading, verdict, opts);
    lines.extend(wrap(error, opts.width));
    if let Some(note) = footer {
        lines.push(String::new());
        lines.extend(wrap(note, opts.width));
    }
    lines
}

fn head(heading: &str, verdict: &VerdictText, opts: TextOptions) -> Vec<String> {
    let rule = "=".repeat(opts.width);
    let mut lines = wrap(heading, opts.width);
    lines.push(rule.clone());
    for title in wrap(&verdict.title, opts.width.saturating_sub(2)) {
        let text = format!(" {title}");
        lines.push(if opts.color {
            let pad = opts.width.saturating_sub(text.width());
            format!("{}{text}{}\x1b[0m", colour(&verdict.state), " ".repeat(pad))
        } else {
            text
        });
    }
    for action in wrap(&verdict.action, opts.width.saturating_sub(2)) {
        lines.push(format!(" {action}"));
    }
    lines.push(rule);
    lines
}

/// Bold white (or black) on the verdict's colour.
fn colour(state: &str) -> &'static str {
    match state {
        "ready" => "\x1b[1;97;42m",
        "catching_up" | "replica_damaged" => "\x1b[1;30;43m",
        "not_serving" | "broker_unreachable" => "\x1b[1;97;41m",
        _ => "\x1b[1;30;47m",
    }
}

/// The few typographic characters the tables use, as ASCII: the Linux console's fonts may
/// lack them (its fonts have no Hangul at all: the tty view is in English).
pub fn console_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{a0}' => ' ',
            '—' | '–' => '-',
            '·' => '-',
            '‘' | '’' => '\'',
            '“' | '”' => '"',
            c => c,
        })
        .collect()
}

/// Greedy word wrap by display width, after [`console_safe`]; a word longer than the line is
/// cut.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let text = console_safe(text);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let needed = if line.is_empty() {
            word.width()
        } else {
            line.width() + 1 + word.width()
        };
        if needed <= width {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        for c in word.chars() {
            if !line.is_empty() && line.width() + c.width().unwrap_or(0) > width {
                lines.push(std::mem::take(&mut line));
            }
            line.push(c);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::i18n::Lang;
    use crate::node::view;
    use proptest::prelude::*;
    use serde_json::json;

    fn doc() -> serde_json::Value {
        json!({
            "appliance_id": "edge-1", "version": "0.1.0", "count": 1234, "lag": 0,
            "ready": false, "broker_connected": false, "uptime_s": 3725,
            "sync": {"hello_acked": false, "gap": null, "snapshot_in_progress": null,
                     "last_applied_age_s": 75},
            "matches": {"answered": 5678, "last_minute": 34},
            "tailscale": {"state": "up", "detail": {"ips": ["100.101.102.103"],
                          "hostname": "comatching-edge.tail4c2a1.ts.net"}},
            "host": {"disk_free_bytes": 12_300_000_000u64, "disk_total_bytes": 31_000_000_000u64,
                     "mem_total_bytes": 3_800_000_000u64, "mem_available_bytes": 1_200_000_000u64,
                     "rss_bytes": 45_000_000},
        })
    }

    #[test]
    fn fits_the_console_in_both_languages() {
        for lang in [Lang::En, Lang::Ko] {
            for color in [false, true] {
                let v = view::build(&doc(), lang);
                let lines = render(
                    &v,
                    "COMAtching appliance edge-1 (0.1.0)",
                    Some(lang.strings().refresh_note),
                    TextOptions { width: 80, color },
                );
                assert!(lines.len() <= 24, "{} lines: {lines:#?}", lines.len());
                for l in &lines {
                    let visible = l.replace("\x1b[0m", "");
                    let visible = visible
                        .split("\x1b[")
                        .map(|part| part.split_once('m').map_or(part, |(_, rest)| rest))
                        .collect::<String>();
                    assert!(visible.width() <= 80, "too wide ({}): {l}", visible.width());
                }
            }
        }
    }

    #[test]
    fn verdict_first_then_facts() {
        let v = view::build(&doc(), Lang::En);
        let text = render(
            &v,
            "COMAtching appliance edge-1",
            None,
            TextOptions::default(),
        )
        .join("\n");
        let expected_start = "COMAtching appliance edge-1\n".to_owned()
            + &"=".repeat(80)
            + "\n Broker unreachable\n Check the network cable and Tailscale. If both are fine, tell the relay\n operator.\n"
            + &"=".repeat(80)
            + "\nStudents in the replica        1,234\n";
        assert!(text.starts_with(&expected_start), "{text}");
        assert!(
            text.contains("\nBroker connection              disconnected\n"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour unless asked");
    }

    #[test]
    fn english_comes_out_as_ascii() {
        let mut ready = doc();
        ready["ready"] = json!(true);
        ready["broker_connected"] = json!(true);
        let v = view::build(&ready, Lang::En);
        let text = render(
            &v,
            "h",
            Some(Lang::En.strings().refresh_note),
            TextOptions::default(),
        )
        .join("\n");
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains(" Ready - serving matches\n"), "{text}");
    }

    #[test]
    fn colour_marks_the_verdict_line_only() {
        let v = view::build(&doc(), Lang::En);
        let lines = render(
            &v,
            "h",
            None,
            TextOptions {
                width: 80,
                color: true,
            },
        );
        let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\x1b')).collect();
        assert_eq!(coloured.len(), 1, "{lines:#?}");
        assert!(coloured[0].starts_with("\x1b[1;97;41m Broker unreachable"));
    }

    #[test]
    fn korean_labels_align_by_display_width() {
        let v = view::build(&doc(), Lang::Ko);
        let lines = render(&v, "h", None, TextOptions::default());
        let students = lines
            .iter()
            .find(|l| l.starts_with("복제본의 학생 수"))
            .unwrap();
        let broker = lines.iter().find(|l| l.starts_with("브로커 연결")).unwrap();
        let col = |l: &str, value: &str| l[..l.find(value).unwrap()].width();
        assert_eq!(col(students, "1,234명"), col(broker, "끊김"));
    }

    proptest! {
        #[test]
        fn wrap_keeps_every_word_within_the_width(
            words in proptest::collection::vec("[a-z가-힣]{1,12}", 0..30),
            width in 4usize..40,
        ) {
            let text = words.join(" ");
            let lines = wrap(&text, width);
            for l in &lines {
                prop_assert!(l.width() <= width, "{l:?} wider than {width}");
            }
            let joined: String = lines.concat().split_whitespace().collect();
            let original: String = text.split_whitespace().collect();
            prop_assert_eq!(joined, original);
        }
    }
}
