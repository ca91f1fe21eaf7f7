//! Files read again while a member runs: TLS certificates, keys, CA bundles and revocation
//! lists, client and peer side alike, each owner deciding what a change means.

use std::sync::Arc;
use std::time::Duration;

/// How often watched files are checked for a change.
pub const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Call `reload` on `target` every [`RELOAD_CHECK_EVERY`] for as long as it lives elsewhere.
/// `reload` answers whether a change took effect; a failure is logged once, until the files
/// change again (not every second), and `what` names the settings kept meanwhile.
pub fn watch<T, E>(target: &Arc<T>, what: &'static str, reload: fn(&T) -> Result<bool, E>)
where
    T: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
{
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        let mut last_failure: Option<String> = None;
        loop {
            tokio::time::sleep(RELOAD_CHECK_EVERY).await;
            let Some(target) = weak.upgrade() else { return };
            match reload(&target) {
                Ok(changed) => {
                    if changed {
                        tracing::info!("{what}: the files changed; new connections use them");
                    }
                    last_failure = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_failure.as_ref() != Some(&e) {
                        tracing::warn!("{e}; keeping the {what} in use");
                        last_failure = Some(e);
                    }
                }
            }
        }
    });
}
