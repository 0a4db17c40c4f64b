//! Logging: the subscriber (JSON lines or text, filtered by `log.level` unless `RUST_LOG` is
//! set, the level reloadable), and the access log's schema.
//!
//! The JSON format is ours rather than tracing-subscriber's because the access log promises
//! every field on every line, `null` where it does not apply, and tracing records an absent
//! `Option` as no field at all: [`JsonLines`] fills the access schema's gaps with `null`.
//! Requests carry their fields on the access event itself rather than in a span, which keeps
//! the cache-hit path free of span bookkeeping.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// The target of the one-line-per-request access log.
pub(crate) const ACCESS_TARGET: &str = "access";

/// Every access log line has all of these, `null` where they do not apply.
pub(crate) const ACCESS_FIELDS: &[&str] = &[
    "request_id",
    "trace_id",
    "caller",
    "auth",
    "auth_error",
    "customer_sync_code",
    "status",
    "bill24_code",
    "cache",
    "cache_tier",
    "upstream_status",
    "upstream_ms",
    "latency_ms",
    "sampled",
];

/// Libraries whose own lines are kept to `error` unless the filter names them, each because
/// the gateway says the same once where they say it over and over:
/// - rustls logs a warning for each bad handshake it sees (an illegal SNI name, with the name
///   in it; an unexpected message): a client could fill the log with them. The gateway logs
///   failed handshakes itself, one line per reason at most once a minute (`identity::tls`).
/// - redis-rs's Cluster client logs a warning for each failed attempt to reach a node, several
///   a second per replica while a node is down. The gateway logs the tier going down and
///   coming back once each (`fleet::conn`).
const QUIET: [(&str, &str); 2] = [("rustls", "rustls=error"), ("redis", "redis=error")];

/// `directives` (`log.level` or `RUST_LOG`) as the filter takes them.
fn filter(directives: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let mut all = directives.to_string();
    for (name, directive) in QUIET {
        if !directives.contains(name) {
            all.push(',');
            all.push_str(directive);
        }
    }
    EnvFilter::builder().parse(all)
}

/// Changes the level filter of the running subscriber.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    rust_log_set: bool,
}

impl LogHandle {
    /// Applies `level` (a `log.level` value) unless `RUST_LOG` decides the filter.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.rust_log_set {
            return Ok(());
        }
        let filter = filter(level).map_err(|e| format!("log.level: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber, writing to stdout.
pub fn init(cfg: &LogConfig) -> Result<LogHandle, String> {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match &rust_log {
        Some(directives) => filter(directives).map_err(|e| format!("RUST_LOG: {e}"))?,
        None => filter(&cfg.level).map_err(|e| format!("log.level: {e}"))?,
    };
    let (filter, handle) = reload::Layer::new(filter);
    let json = (cfg.format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stdout)
    });
    let text = (cfg.format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_target(true)
            // Colours for a person at a terminal; none in a file or a log pipeline.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_writer(std::io::stdout)
    });
    Registry::default()
        .with(filter)
        .with(json)
        .with(text)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogHandle {
        filter: handle,
        rust_log_set: rust_log.is_some(),
    })
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's fields (`message`
/// among them), and for access lines every [`ACCESS_FIELDS`] name.
pub(crate) struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = JsonLine::default();
        let now = clock::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.string("timestamp", &now);
        line.string("level", meta.level().as_str());
        line.string("target", meta.target());
        event.record(&mut line);
        if meta.target() == ACCESS_TARGET {
            for name in ACCESS_FIELDS {
                if !line.seen.contains(name) {
                    line.raw(name, "null");
                }
            }
        }
        line.buf.push(b'}');
        // serde_json only ever writes UTF-8.
        let mut rest = std::str::from_utf8(&line.buf).map_err(|_| fmt::Error)?;
        // U+2028 and U+2029 are valid in JSON strings but end a line for JavaScript and some
        // log shippers: escaped (they occur only inside strings here).
        while let Some(at) = rest.find(['\u{2028}', '\u{2029}']) {
            writer.write_str(&rest[..at])?;
            let separator = &rest[at..at + 3];
            writer.write_str(if separator == "\u{2028}" {
                "\\u2028"
            } else {
                "\\u2029"
            })?;
            rest = &rest[at + 3..];
        }
        writer.write_str(rest)?;
        writer.write_char('\n')
    }
}

#[derive(Default)]
struct JsonLine {
    buf: Vec<u8>,
    seen: Vec<&'static str>,
}

impl JsonLine {
    fn key(&mut self, name: &str) {
        self.buf.push(if self.buf.is_empty() { b'{' } else { b',' });
        let _ = serde_json::to_writer(&mut self.buf, name);
        self.buf.push(b':');
    }

    fn string(&mut self, name: &str, value: &str) {
        self.key(name);
        let _ = serde_json::to_writer(&mut self.buf, value);
    }

    fn raw(&mut self, name: &str, json: &str) {
        self.key(name);
        self.buf.extend_from_slice(json.as_bytes());
    }

    fn note(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.seen.contains(&name) {
            return false;
        }
        self.seen.push(name);
        true
    }
}

impl Visit for JsonLine {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.note(field) {
            match serde_json::Number::from_f64(value) {
                Some(n) => self.raw(field.name(), &n.to_string()),
                None => self.raw(field.name(), "null"),
            }
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.note(field) {
            self.raw(field.name(), itoa::Buffer::new().format(value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.note(field) {
            self.raw(field.name(), itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.note(field) {
            self.raw(field.name(), if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.note(field) {
            self.string(field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.note(field) {
            self.string(field.name(), &format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(f: impl FnOnce()) -> Vec<serde_json::Value> {
        capture_text(f)
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    fn capture_text(f: impl FnOnce()) -> String {
        let out = Capture::default();
        let subscriber = Registry::default().with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .with_writer(out.clone()),
        );
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn line_and_paragraph_separators_are_escaped() {
        let odd = "a\u{2028}b\u{2029}c \u{2028}\u{2028}";
        let text = capture_text(|| tracing::warn!(value = odd, "x\u{2029}y"));
        assert!(!text.contains(['\u{2028}', '\u{2029}']), "{text:?}");
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains(r"a\u2028b\u2029c \u2028\u2028"), "{text}");
        let line: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(line["value"], odd);
        assert_eq!(line["message"], "x\u{2029}y");
    }

    #[test]
    fn noisy_libraries_are_kept_to_errors_unless_the_filter_names_them() {
        let shown = |directives: &str| filter(directives).expect("parses").to_string();
        assert!(shown("info").contains("rustls=error"), "{}", shown("info"));
        assert!(shown("debug,bill24_gateway=trace").contains("rustls=error"));
        assert!(!shown("info,rustls=debug").contains("rustls=error"));
        assert!(shown("info").contains("redis=error"));
        assert!(!shown("warn,redis=warn").contains("redis=error"));
        assert!(shown("warn,redis=warn").contains("rustls=error"));
    }

    #[test]
    fn access_lines_have_every_field_with_nulls() {
        let lines = capture(|| {
            let caller: Option<&str> = None;
            tracing::info!(
                target: ACCESS_TARGET,
                request_id = "r1",
                caller = caller,
                status = 401u16,
                latency_ms = 0.25,
                "request"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = lines[0].as_object().expect("object");
        for name in ACCESS_FIELDS {
            assert!(line.contains_key(*name), "{name} in {line:?}");
        }
        assert_eq!(line["request_id"], "r1");
        assert_eq!(line["status"], 401);
        assert!(line["caller"].is_null());
        assert!(line["upstream_status"].is_null());
        assert_eq!(line["latency_ms"], 0.25);
        assert_eq!(line["message"], "request");
        assert_eq!(line["level"], "INFO");
    }

    #[test]
    fn other_lines_are_plain_json_with_escaping() {
        let lines = capture(|| {
            tracing::warn!(error = %"quote\" and\nnewline", count = 3u64, "something \"odd\"");
        });
        let line = &lines[0];
        assert_eq!(line["error"], "quote\" and\nnewline");
        assert_eq!(line["count"], 3);
        assert_eq!(line["message"], "something \"odd\"");
        assert!(
            line.get("caller").is_none(),
            "no access schema on other lines"
        );
    }
}
