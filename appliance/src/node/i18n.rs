//! The staff views' words: one table per language ([`KO`], the default, and [`EN`]), which
//! language a request gets, and the number/duration/size formats.
//!
//! A table is a [`Strings`] value, so the compiler refuses a language that lacks a string.
//! Placeholders are `{name}` and are filled by [`fill`]. English is the language of the tty1
//! view (`status --watch`): the Linux console's fonts have no Hangul. The text view turns the
//! few typographic characters the English table uses (the em dash, the no-break space) into
//! ASCII for the console (`status_text::console_safe`); the Korean table is for browsers and
//! terminals that can draw it.
//!
//! Language choice ([`choose`]), first that applies: an explicit `?lang=` (the page's switch,
//! which also sets the cookie), the `lang` cookie, the first of Korean or English in
//! `Accept-Language` by preference, Korean.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Ko,
    En,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ko => "ko",
            Lang::En => "en",
        }
    }

    pub fn parse(s: &str) -> Option<Lang> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ko" => Some(Lang::Ko),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn other(self) -> Lang {
        match self {
            Lang::Ko => Lang::En,
            Lang::En => Lang::Ko,
        }
    }

    pub fn strings(self) -> &'static Strings {
        match self {
            Lang::Ko => &KO,
            Lang::En => &EN,
        }
    }
}

/// The language of a request: `query` is the `lang` query parameter (already validated),
/// `cookie` the `Cookie` header, `accept` the `Accept-Language` header.
pub fn choose(query: Option<Lang>, cookie: Option<&str>, accept: Option<&str>) -> Lang {
    query
        .or_else(|| cookie.and_then(cookie_lang))
        .or_else(|| accept.and_then(accept_lang))
        .unwrap_or(Lang::Ko)
}

/// The `lang` cookie's value, if it names a language we have.
fn cookie_lang(header: &str) -> Option<Lang> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == "lang")
        .and_then(|(_, value)| Lang::parse(value.trim_matches('"')))
}

/// The most preferred of Korean and English in an `Accept-Language` header (RFC 9110 §12.5.4:
/// comma-separated ranges with optional `;q=` weights; ties go to the earlier range).
fn accept_lang(header: &str) -> Option<Lang> {
    let mut best: Option<(f32, Lang)> = None;
    for range in header.split(',') {
        let mut parts = range.split(';');
        let tag = parts.next().unwrap_or("").trim();
        let primary = tag.split('-').next().unwrap_or("");
        let Some(lang) = Lang::parse(primary) else {
            continue;
        };
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, lang));
        }
    }
    best.map(|(_, l)| l)
}

/// Replaces each `{name}` in `template` by its value.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in decimal units with three significant figures at most: `12.3 GB`, `456 MB` (with a
/// no-break space).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    // A no-break space keeps "22.2 GB" on one line on a phone (the text view turns it back).
    if unit == 0 || value >= 100.0 {
        format!("{value:.0}\u{a0}{}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1}\u{a0}{}", UNITS[unit])
    } else {
        format!("{value:.2}\u{a0}{}", UNITS[unit])
    }
}

/// A duration for people: `45 s`, `12 min`, `3 h 4 min`, `2 d 5 h` (in the table's words).
pub fn duration(s: &Strings, secs: u64) -> String {
    let n = |v: u64| v.to_string();
    if secs < 60 {
        fill(s.secs, &[("n", &n(secs))])
    } else if secs < 3600 {
        fill(s.mins, &[("n", &n(secs / 60))])
    } else if secs < 86_400 {
        fill(
            s.hours,
            &[("h", &n(secs / 3600)), ("m", &n(secs % 3600 / 60))],
        )
    } else {
        fill(
            s.days,
            &[("d", &n(secs / 86_400)), ("h", &n(secs % 86_400 / 3600))],
        )
    }
}

/// Every string the staff views show, in one language.
#[derive(Debug)]
pub struct Strings {
    pub page_title: &'static str,
    /// The language switch's label: the *other* language's own name.
    pub switch_to: &'static str,

    pub ready: &'static str,
    pub catching_up_n: &'static str,
    pub catching_up: &'static str,
    pub not_serving: &'static str,
    pub broker_unreachable: &'static str,
    pub replica_damaged: &'static str,
    /// Shown by the page's script (and the CLI) when the appliance does not answer at all.
    pub no_answer: &'static str,

    pub reason_store_unavailable: &'static str,
    pub reason_stuck: &'static str,
    pub reason_relay_silent: &'static str,

    pub action_safe_to_reboot: &'static str,
    pub action_wait: &'static str,
    pub action_check_network: &'static str,
    pub action_check_disk: &'static str,
    pub action_tell_relay_operator: &'static str,
    pub action_no_answer: &'static str,

    pub fact_students: &'static str,
    pub fact_in_step: &'static str,
    pub fact_last_change: &'static str,
    pub fact_matches_minute: &'static str,
    pub fact_matches_total: &'static str,
    pub fact_broker: &'static str,
    pub fact_tailscale: &'static str,
    pub fact_disk: &'static str,
    pub fact_memory: &'static str,
    pub fact_uptime: &'static str,
    pub fact_id: &'static str,
    pub fact_version: &'static str,

    pub students_n: &'static str,
    pub matches_n: &'static str,
    pub yes: &'static str,
    pub behind_n: &'static str,
    pub unknown: &'static str,
    pub ago: &'static str,
    pub none_since_start: &'static str,
    pub connected: &'static str,
    pub disconnected: &'static str,
    pub ts_up: &'static str,
    pub ts_starting: &'static str,
    pub ts_needs_login: &'static str,
    pub ts_needs_approval: &'static str,
    pub ts_stopped: &'static str,
    pub ts_daemon_down: &'static str,
    pub ts_cli_missing: &'static str,
    pub ts_timeout: &'static str,
    pub ts_error: &'static str,
    pub ts_checking: &'static str,
    pub disk_value: &'static str,
    pub memory_value: &'static str,

    pub secs: &'static str,
    pub mins: &'static str,
    pub hours: &'static str,
    pub days: &'static str,

    pub details: &'static str,
    pub refresh_note: &'static str,
    pub last_update: &'static str,
}

pub static KO: Strings = Strings {
    page_title: "COMAtching 어플라이언스",
    switch_to: "English",

    ready: "정상 — 매칭 처리 중",
    catching_up_n: "따라잡는 중 (변경 {n}건 남음)",
    catching_up: "따라잡는 중",
    not_serving: "매칭 중단: {reason}",
    broker_unreachable: "브로커에 연결할 수 없음",
    replica_damaged: "복제본 손상 — 다시 만드는 중",
    no_answer: "어플라이언스가 응답하지 않음",

    reason_store_unavailable: "데이터 저장소를 열 수 없음",
    reason_stuck: "변경 사항을 저장할 수 없음",
    reason_relay_silent: "릴레이가 응답하지 않음",

    action_safe_to_reboot: "할 일 없음. 재부팅해도 안전합니다.",
    action_wait: "기다리세요. 1분 안에 저절로 회복됩니다.",
    action_check_network: "네트워크 케이블과 Tailscale을 확인하세요. 둘 다 정상이면 릴레이 운영자에게 알리세요.",
    action_check_disk: "디스크 여유 공간을 확인하고 재부팅하세요. 그래도 계속되면 릴레이 운영자에게 알리세요.",
    action_tell_relay_operator: "릴레이 운영자에게 알리세요.",
    action_no_answer: "전원을 껐다 켜고 1분 기다리세요. 그래도 응답이 없으면 릴레이 운영자에게 알리세요.",

    fact_students: "복제본의 학생 수",
    fact_in_step: "릴레이와 동기화",
    fact_last_change: "마지막 변경 적용",
    fact_matches_minute: "최근 1분 매칭 응답",
    fact_matches_total: "시작 후 매칭 응답",
    fact_broker: "브로커 연결",
    fact_tailscale: "Tailscale",
    fact_disk: "데이터 디스크 여유 공간",
    fact_memory: "메모리",
    fact_uptime: "가동 시간",
    fact_id: "어플라이언스 ID",
    fact_version: "버전",

    students_n: "{n}명",
    matches_n: "{n}건",
    yes: "예 (최신 상태)",
    behind_n: "{n}건 뒤처짐",
    unknown: "알 수 없음",
    ago: "{age} 전",
    none_since_start: "시작한 뒤 없음",
    connected: "연결됨",
    disconnected: "끊김",
    ts_up: "연결됨 ({name})",
    ts_starting: "연결 중",
    ts_needs_login: "로그아웃됨",
    ts_needs_approval: "관리자 승인 대기 중",
    ts_stopped: "꺼짐 (tailscale down)",
    ts_daemon_down: "tailscaled가 실행되지 않음",
    ts_cli_missing: "설치되지 않음",
    ts_timeout: "응답 없음",
    ts_error: "오류",
    ts_checking: "확인 중",
    disk_value: "{free} 남음 (전체 {total})",
    memory_value: "어플라이언스 {rss} 사용, 여유 {avail} (전체 {total})",

    secs: "{n}초",
    mins: "{n}분",
    hours: "{h}시간 {m}분",
    days: "{d}일 {h}시간",

    details: "기술 정보",
    refresh_note: "2초마다 자동으로 새로 고칩니다.",
    last_update: "마지막 갱신",
};

pub static EN: Strings = Strings {
    page_title: "COMAtching appliance",
    switch_to: "한국어",

    ready: "Ready — serving matches",
    catching_up_n: "Catching up ({n} changes behind)",
    catching_up: "Catching up",
    not_serving: "Not serving: {reason}",
    broker_unreachable: "Broker unreachable",
    replica_damaged: "Replica damaged, rebuilding",
    no_answer: "Appliance not answering",

    reason_store_unavailable: "the data store cannot be opened",
    reason_stuck: "a change cannot be saved",
    reason_relay_silent: "the relay does not answer",

    action_safe_to_reboot: "Nothing to do. Safe to reboot.",
    action_wait: "Nothing to do: it heals by itself within a minute.",
    action_check_network: "Check the network cable and Tailscale. If both are fine, tell the relay operator.",
    action_check_disk: "Check that the disk has free space, then reboot. If it stays, tell the relay operator.",
    action_tell_relay_operator: "Tell the relay operator.",
    action_no_answer: "Power-cycle the box and wait a minute. If it still does not answer, tell the relay operator.",

    fact_students: "Students in the replica",
    fact_in_step: "In step with the relay",
    fact_last_change: "Last change applied",
    fact_matches_minute: "Matches answered, last minute",
    fact_matches_total: "Matches answered since start",
    fact_broker: "Broker connection",
    fact_tailscale: "Tailscale",
    fact_disk: "Disk free (data partition)",
    fact_memory: "Memory",
    fact_uptime: "Uptime",
    fact_id: "Appliance id",
    fact_version: "Version",

    students_n: "{n}",
    matches_n: "{n}",
    yes: "yes",
    behind_n: "{n} changes behind",
    unknown: "unknown",
    ago: "{age} ago",
    none_since_start: "none since start",
    connected: "connected",
    disconnected: "disconnected",
    ts_up: "connected as {name}",
    ts_starting: "connecting",
    ts_needs_login: "logged out",
    ts_needs_approval: "waiting for an admin's approval",
    ts_stopped: "stopped (tailscale down)",
    ts_daemon_down: "tailscaled not running",
    ts_cli_missing: "not installed",
    ts_timeout: "not answering",
    ts_error: "error",
    ts_checking: "checking",
    disk_value: "{free} free of {total}",
    memory_value: "appliance uses {rss}; {avail} free of {total}",

    secs: "{n} s",
    mins: "{n} min",
    hours: "{h} h {m} min",
    days: "{d} d {h} h",

    details: "Technical details",
    refresh_note: "Refreshes every 2 s.",
    last_update: "Last update",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_choice() {
        assert_eq!(choose(None, None, None), Lang::Ko, "Korean by default");
        assert_eq!(choose(None, None, Some("en-US,en;q=0.9")), Lang::En);
        assert_eq!(
            choose(None, None, Some("fr-FR,ko;q=0.5,en;q=0.4")),
            Lang::Ko
        );
        assert_eq!(choose(None, None, Some("en;q=0.3, ko-KR;q=0.8")), Lang::Ko);
        assert_eq!(
            choose(None, None, Some("ko, en")),
            Lang::Ko,
            "ties: the earlier"
        );
        assert_eq!(
            choose(None, None, Some("en;q=0, fr")),
            Lang::Ko,
            "q=0 means never"
        );
        assert_eq!(choose(None, None, Some("de-DE")), Lang::Ko);
        // The cookie beats the browser, the explicit switch beats the cookie.
        assert_eq!(choose(None, Some("a=b; lang=en"), Some("ko")), Lang::En);
        assert_eq!(
            choose(None, Some("xlang=en; lang=\"ko\""), Some("en")),
            Lang::Ko
        );
        assert_eq!(choose(None, Some("lang=fr"), Some("en")), Lang::En);
        assert_eq!(
            choose(Some(Lang::Ko), Some("lang=en"), Some("en")),
            Lang::Ko
        );
        assert_eq!(Lang::parse(" EN "), Some(Lang::En));
        assert_eq!(Lang::parse("english"), None);
    }

    #[test]
    fn formats() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        let b = |n| bytes(n).replace('\u{a0}', " ");
        assert_eq!(b(0), "0 B");
        assert_eq!(b(999), "999 B");
        assert_eq!(b(1_234), "1.23 kB");
        assert_eq!(b(45_600_000), "45.6 MB");
        assert_eq!(b(123_000_000_000), "123 GB");
        assert_eq!(b(u64::MAX), "18446744 TB");
        assert!(
            bytes(1_234).contains('\u{a0}'),
            "number and unit stay together"
        );
        assert_eq!(duration(&EN, 5), "5 s");
        assert_eq!(duration(&EN, 125), "2 min");
        assert_eq!(duration(&EN, 3 * 3600 + 4 * 60 + 5), "3 h 4 min");
        assert_eq!(duration(&KO, 2 * 86_400 + 5 * 3600), "2일 5시간");
        assert_eq!(
            fill("{a} and {b}, {a}", &[("a", "x"), ("b", "y")]),
            "x and y, x"
        );
    }

    #[test]
    fn english_is_ascii_once_made_console_safe() {
        let text = crate::node::status_text::console_safe(&format!("{EN:?}"));
        let odd: String = text.chars().filter(|c| !c.is_ascii()).collect();
        // The switch label names Korean in Korean: it is shown by browsers only.
        assert_eq!(odd, EN.switch_to, "the console could not draw these");
    }
}
