//! Prometheus metrics, in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Counters and a latency histogram; the store-wide gauges are counted in
/// the background (`AppState::gauges`) and given to [`Metrics::render`].
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<String, u64>>,
    issuances: Mutex<BTreeMap<String, u64>>,
    latency_buckets: [AtomicU64; 12],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    limited: [AtomicU64; crate::limits::Limit::ALL.len()],
}

impl Metrics {
    /// Counts a request by its outcome class (`2xx`, `4xx`, `5xx`).
    pub fn request(&self, status: u16) {
        let class = format!("{}xx", status / 100);
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(class)
            .or_default() += 1;
    }

    /// Counts an issuance decision: `issued` or the refusal's code.
    pub fn issuance(&self, outcome: &str) {
        *self
            .issuances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    /// Counts a refusal by a limit.
    pub fn limited(&self, limit: crate::limits::Limit) {
        if let Some(i) = crate::limits::Limit::ALL.iter().position(|l| *l == limit) {
            self.limited[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how long an issuance took.
    pub fn latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Renders everything, with the scrape-time gauges given.
    pub fn render(
        &self,
        by_status: &BTreeMap<&'static str, u64>,
        expiries: &[(&str, Option<f64>)],
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP meshca_requests_total API requests by status class.\n# TYPE meshca_requests_total counter"
        );
        for (class, n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "meshca_requests_total{{class=\"{class}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP meshca_issuances_total Issuance decisions by outcome.\n# TYPE meshca_issuances_total counter"
        );
        for (outcome, n) in self
            .issuances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "meshca_issuances_total{{outcome=\"{outcome}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP meshca_issuance_duration_seconds Time to issue and record a certificate.\n# TYPE meshca_issuance_duration_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshca_issuance_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "meshca_issuance_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "meshca_issuance_duration_seconds_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "meshca_issuance_duration_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP meshca_limited_total Requests refused by a limit, by its [limits] key.\n# TYPE meshca_limited_total counter"
        );
        for (i, limit) in crate::limits::Limit::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshca_limited_total{{limit=\"{}\"}} {}",
                limit.key(),
                self.limited[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshca_certificates Recorded certificates by status.\n# TYPE meshca_certificates gauge"
        );
        for (status, n) in by_status {
            let _ = writeln!(out, "meshca_certificates{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP meshca_expiry_seconds Seconds until the earliest expiry of each kind.\n# TYPE meshca_expiry_seconds gauge"
        );
        for (kind, secs) in expiries {
            if let Some(s) = secs {
                let _ = writeln!(out, "meshca_expiry_seconds{{kind=\"{kind}\"}} {s:.0}");
            }
        }
        out
    }
}
