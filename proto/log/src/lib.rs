//! Logging, set up once for every program: a level filter (`RUST_LOG` syntax) checked at
//! start and changeable while running, lines as text or JSON on standard output.
//!
//! Every line is written when it is logged. (Writing access lines from a buffer on a
//! thread of their own was tried and measured: no CPU gain on this machine, and log
//! readers, the tests among them, expect a request's access line by the time its answer
//! arrives. README, "Benchmarks".)

#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object per line, the event's fields flattened into it.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {level:?}: {reason}")]
    Level { level: String, reason: String },
    #[error("the log level cannot be changed: {0}")]
    Reload(String),
}

/// Changes the level filter of a running process (`RUST_LOG` syntax).
pub type Reload = Arc<dyn Fn(&str) -> Result<(), LogError> + Send + Sync>;

/// Parses a level filter (`RUST_LOG` syntax), so a bad one is refused at start.
pub fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Level {
        level: level.to_string(),
        reason: e.to_string(),
    })
}

/// Sets up this process's logging to standard output; returns the level's reload handle.
pub fn init(level: &str, format: Format) -> Result<Reload, LogError> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (layer, reload) = layer(level, format, ansi, std::io::stdout)?;
    tracing_subscriber::registry().with(layer).init();
    Ok(reload)
}

/// [`init`], or the process ends with status 2 and says why (`program: …` on stderr):
/// a level filter that cannot be understood is refused at start, never replaced.
pub fn init_or_exit(program: &str, level: &str, format: Format) -> Reload {
    init(level, format).unwrap_or_else(|e| {
        eprintln!("{program}: {e}");
        std::process::exit(2)
    })
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// The layer [`init`] installs, writing to `writer`; public for tests that install it on
/// a subscriber of their own.
pub fn layer<W>(
    level: &str,
    format: Format,
    ansi: bool,
    writer: W,
) -> Result<(Boxed, Reload), LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (level_filter, handle) = reload::Layer::new(filter(level)?);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    // The filter is the writing layer's own rather than a layer in front of it: only then
    // does the subscriber report the filter's most verbose level, so that a disabled
    // `debug!` or `trace!` (h2's and hyper's, several per frame) is skipped by comparing
    // two integers instead of asking the filter each time (2.5% of ztunnel's CPU under
    // keep-alive load). A reload recomputes that level. (Another layer stacked beside
    // this one would see every event and bring the bound back to TRACE.)
    let layer: Boxed = match format {
        Format::Text => fmt.with_filter(level_filter).boxed(),
        Format::Json => fmt
            .json()
            .flatten_event(true)
            .with_filter(level_filter)
            .boxed(),
    };
    let reload: Reload = Arc::new(move |level: &str| {
        handle
            .reload(filter(level)?)
            .map_err(|e| LogError::Reload(e.to_string()))
    });
    Ok((layer, reload))
}

/// A writer that keeps what is logged in memory, for tests that read their own lines
/// (give it to [`layer`], or to any subscriber, as the writer).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("captured lock")).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("captured lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_reports_the_most_verbose_level_enabled_and_a_reload_moves_it() {
        use tracing::Subscriber;
        use tracing::level_filters::LevelFilter;
        let out = Captured::default();
        let (layer, reload) = layer("info", Format::Text, false, out.clone()).unwrap();
        let subscriber = Arc::new(Registry::default().with(layer));
        // Without the bound every disabled `debug!` asks the filter (h2 logs per frame).
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::INFO));
        tracing::subscriber::with_default(subscriber.clone(), || {
            tracing::debug!("hidden");
            tracing::info!("shown");
            reload("info,access=debug").unwrap();
            assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::DEBUG));
            tracing::debug!(target: "access", "access line");
            tracing::debug!("still hidden");
        });
        let text = out.text();
        assert!(
            text.contains("shown") && text.contains("access line"),
            "{text}"
        );
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn a_reload_turns_on_a_line_whose_level_was_off_when_it_was_first_reached() {
        let out = Captured::default();
        let (layer, reload) = layer("info", Format::Json, false, out.clone()).unwrap();
        tracing::subscriber::with_default(Registry::default().with(layer), || {
            for filter in ["info", "debug", "info"] {
                reload(filter).unwrap();
                // The same call site each time: its first visit finds it disabled.
                tracing::debug!(filter, "one call site");
            }
        });
        let text = out.text();
        assert_eq!(text.matches("one call site").count(), 1, "{text}");
        assert!(text.contains(r#""filter":"debug""#), "{text}");
    }

    #[test]
    fn a_bad_level_is_refused_with_what_was_given() {
        let e = filter("info,[").unwrap_err().to_string();
        assert!(e.starts_with("invalid log level \"info,[\""), "{e}");
    }
}
