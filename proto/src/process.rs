//! The process metrics every Prometheus client library exports (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), read from `/proc/self` at scrape
//! time: pure parsers of the `/proc` files, a thin reader, and a renderer each program's
//! `/metrics` appends.

use std::fmt::Write;

/// Clock ticks per second in `/proc` times (`USER_HZ`: 100 on every Linux architecture
/// the kernel exports to userspace, as Prometheus' own procfs reader assumes).
pub const USER_HZ: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

/// What `/proc/self/stat` says: (user + system CPU ticks, start time in ticks since
/// boot). Fields count from after the command name, which may itself hold spaces and
/// parentheses, so parsing starts after its last `)`.
pub fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3; utime 14, stime 15, starttime 22.
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// `VmRSS` and `VmSize` of `/proc/self/status`, in bytes.
pub fn parse_status(status: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some((kb("VmRSS")?, kb("VmSize")?))
}

/// Boot time (`btime`, seconds since the epoch) from `/proc/stat`.
pub fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit on open files from `/proc/self/limits` (`unlimited`: u64::MAX).
pub fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// The stats from the files' contents: `stat` (`/proc/self/stat`), `status`, `proc_stat`
/// (`/proc/stat`), `limits`, and the number of entries in `/proc/self/fd`.
pub fn stats_from(
    stat: &str,
    status: &str,
    proc_stat: &str,
    limits: &str,
    open_fds: u64,
) -> Option<ProcessStats> {
    let (cpu_ticks, start_ticks) = parse_stat(stat)?;
    let (resident_bytes, virtual_bytes) = parse_status(status)?;
    Some(ProcessStats {
        cpu_seconds: cpu_ticks as f64 / USER_HZ,
        resident_bytes,
        virtual_bytes,
        open_fds,
        max_fds: parse_max_fds(limits)?,
        start_time_seconds: parse_btime(proc_stat)? as f64 + start_ticks as f64 / USER_HZ,
    })
}

/// Reads this process' stats (`None` off Linux or when `/proc` is not mounted).
pub fn read() -> Option<ProcessStats> {
    let file = |p: &str| std::fs::read_to_string(p).ok();
    // The listing holds the descriptor reading it: not counted, as in client_golang.
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    stats_from(
        &file("/proc/self/stat")?,
        &file("/proc/self/status")?,
        &file("/proc/stat")?,
        &file("/proc/self/limits")?,
        fds.saturating_sub(1),
    )
}

/// The exposition format the rest of the page is in: the two name a counter's family
/// differently (`process_cpu_seconds_total` vs `process_cpu_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 (what `prometheus-client` encodes).
    OpenMetrics,
}

/// The six metrics with their HELP and TYPE lines.
pub fn render(s: &ProcessStats, format: Format) -> String {
    let mut out = String::new();
    let cpu_family = match format {
        Format::Prometheus => "process_cpu_seconds_total",
        Format::OpenMetrics => "process_cpu_seconds",
    };
    let _ = write!(
        out,
        "# HELP {cpu_family} Total user and system CPU time spent in seconds.\n# TYPE {cpu_family} counter\nprocess_cpu_seconds_total {}\n",
        s.cpu_seconds
    );
    let gauges: [(&str, &str, String); 5] = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            s.resident_bytes.to_string(),
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            s.virtual_bytes.to_string(),
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            s.open_fds.to_string(),
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            // An unlimited soft limit, as client_golang reports it.
            if s.max_fds == u64::MAX {
                "+Inf".into()
            } else {
                s.max_fds.to_string()
            },
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            s.start_time_seconds.to_string(),
        ),
    ];
    for (name, help, v) in gauges {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        );
    }
    out
}

/// `page` with the process metrics added: before OpenMetrics' closing `# EOF`, else at
/// the end. Nothing is added when `/proc` cannot be read.
pub fn append(page: &mut String, format: Format) {
    if let Some(s) = read() {
        insert(page, &render(&s, format));
    }
}

fn insert(page: &mut String, block: &str) {
    match page.rfind("# EOF") {
        Some(i) => page.insert_str(i, block),
        None => {
            if !page.is_empty() && !page.ends_with('\n') {
                page.push('\n');
            }
            page.push_str(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line, with a command name holding a space and a parenthesis.
    const STAT: &str = "4242 (ztun nel) x) S 1 4242 4242 0 -1 4194560 1931 0 0 0 250 75 0 0 20 0 4 0 123456 52785152 2410 18446744073709551615 1 1 0 0 0 0 0 4096 17003 0 0 0 17 1 0 0 0 0 0";
    const STATUS: &str = "Name:\tztunnel\nVmPeak:\t  60000 kB\nVmSize:\t   51548 kB\nVmRSS:\t    9640 kB\nThreads:\t4\n";
    const PROC_STAT: &str = "cpu  1 2 3 4\nintr 1 2\nbtime 1764460800\nprocesses 100\n";
    const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_stat(STAT), Some((325, 123456)));
        assert_eq!(parse_status(STATUS), Some((9640 * 1024, 51548 * 1024)));
        assert_eq!(parse_btime(PROC_STAT), Some(1764460800));
        assert_eq!(parse_max_fds(LIMITS), Some(1024));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            Some(u64::MAX)
        );
        let s = stats_from(STAT, STATUS, PROC_STAT, LIMITS, 17).unwrap();
        assert_eq!(s.cpu_seconds, 3.25);
        assert_eq!(s.start_time_seconds, 1764460800.0 + 1234.56);
        assert_eq!((s.open_fds, s.max_fds), (17, 1024));
        for bad in ["", "4242 (x) S 1", "no parenthesis at all"] {
            assert_eq!(parse_stat(bad), None, "{bad}");
        }
        assert_eq!(parse_status("VmRSS: 12 kB\n"), None, "VmSize missing");
    }

    #[test]
    fn renders_in_either_format_before_eof() {
        let s = stats_from(STAT, STATUS, PROC_STAT, LIMITS, 17).unwrap();
        let p = render(&s, Format::Prometheus);
        assert!(
            p.contains(
                "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.25\n"
            ),
            "{p}"
        );
        assert!(p.contains("process_resident_memory_bytes 9871360\n"), "{p}");
        assert!(p.contains("process_virtual_memory_bytes 52785152\n"), "{p}");
        assert!(p.contains("process_open_fds 17\n"), "{p}");
        assert!(p.contains("process_max_fds 1024\n"), "{p}");
        assert!(
            p.contains("process_start_time_seconds 1764462034.56\n"),
            "{p}"
        );
        let o = render(&s, Format::OpenMetrics);
        assert!(
            o.contains("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 3.25\n"),
            "{o}"
        );
        let mut page = "# TYPE a gauge\na 1\n# EOF\n".to_string();
        insert(&mut page, &o);
        assert!(page.starts_with("# TYPE a gauge\na 1\n# HELP process_cpu_seconds"));
        assert!(
            page.ends_with("process_start_time_seconds 1764462034.56\n# EOF\n"),
            "{page}"
        );
        let mut page = "a 1".to_string();
        insert(&mut page, "b 2\n");
        assert_eq!(page, "a 1\nb 2\n");
    }

    /// The reader against this very process.
    #[test]
    fn reads_this_process() {
        let s = read().expect("/proc/self");
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.start_time_seconds > now - 86400.0 * 365.0 && s.start_time_seconds <= now + 1.0);
    }
}
