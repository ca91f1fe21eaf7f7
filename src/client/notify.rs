//! NOTIFY: the failover controller tells the operators by a webhook (a JSON POST) what it did,
//! with the journal's timeline and each step's duration, or that a failover awaits approval
//! with which token. A failing webhook is tried again, a bounded number of times; then the
//! runbook goes on without it (the controller's log has the same record).

use std::time::Duration;

use serde::Deserialize;

/// The most attempts a webhook call may be given.
pub const NOTIFY_ATTEMPTS_MAX: u32 = 5;
/// The longest a single attempt may be given, in milliseconds.
pub const NOTIFY_TIMEOUT_MS_MAX: u64 = 10_000;
/// The longest wait between two attempts, in milliseconds: 200 ms, doubling, up to this.
pub const NOTIFY_BACKOFF_MS_MAX: u64 = 5_000;
/// Every attempt and wait of one notification, at their longest, in milliseconds: inside the
/// controller's bound on a step, so NOTIFY ends by itself, failed or not.
pub const NOTIFY_DURATION_MS_MAX: u64 = NOTIFY_ATTEMPTS_MAX as u64 * (NOTIFY_TIMEOUT_MS_MAX + NOTIFY_BACKOFF_MS_MAX);
const _: () = assert!(NOTIFY_DURATION_MS_MAX < crate::controller::STEP_DURATION_MAX.as_millis() as u64);

/// The controller configuration's `notify` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where to POST (`http://` or `https://`; https verified by the platform's roots).
    pub webhook: String,
    /// Attempts per notification, 1 to [`NOTIFY_ATTEMPTS_MAX`].
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Each attempt's deadline, 1 to [`NOTIFY_TIMEOUT_MS_MAX`] ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_attempts() -> u32 {
    5
}
fn default_timeout_ms() -> u64 {
    5_000
}

impl NotifyConfig {
    /// Why this configuration cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(self.webhook.starts_with("http://") || self.webhook.starts_with("https://")) {
            return Err(format!("notify.webhook {:?}: an http:// or https:// URL", self.webhook));
        }
        if !(1..=NOTIFY_ATTEMPTS_MAX).contains(&self.attempts) {
            return Err(format!("notify.attempts {}: from 1 to {NOTIFY_ATTEMPTS_MAX}", self.attempts));
        }
        if !(1..=NOTIFY_TIMEOUT_MS_MAX).contains(&self.timeout_ms) {
            return Err(format!("notify.timeout_ms {}: from 1 to {NOTIFY_TIMEOUT_MS_MAX}", self.timeout_ms));
        }
        Ok(())
    }

    /// POST `body` as JSON, trying again after a failure (an error or a status other than 2xx)
    /// with a doubling wait. Returns the attempts it took.
    ///
    /// Errors: the last failure, once every attempt failed.
    pub async fn post(&self, body: &serde_json::Value) -> Result<u32, String> {
        // reqwest takes the process's rustls provider; the project's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(self.timeout_ms))
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        let bytes = serde_json::to_vec(body).expect("a JSON value encodes");
        let mut wait = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let sent = client
                .post(&self.webhook)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(attempt),
                Ok(r) => last = format!("{} answered {}", self.webhook, r.status()),
                Err(e) => last = format!("{}: {e}", self.webhook),
            }
            tracing::warn!("webhook attempt {attempt} of {} failed: {last}", self.attempts);
            if attempt < self.attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(NOTIFY_BACKOFF_MS_MAX));
            }
        }
        Err(format!("webhook failed {} times; the last: {last}", self.attempts))
    }
}
