//! Paging through a kind of record kept in every partition (`p/{p}/{kind}/...`), in partition
//! order. The page token is the key of the last record examined.

use std::sync::Arc;

use tidings_scheduler::store::{KeyValue, Store, prefix_end};

use super::ApiError;

/// Records examined per call before a partial page is returned.
const SCAN_LIMIT: usize = 20_000;

/// Returns up to `size` records of `kind` accepted by `keep`, after the page token, and the
/// token of the next page (empty at the end).
pub(crate) async fn scan<T>(
    store: &Arc<dyn Store>,
    partitions: u32,
    kind: &str,
    token: &str,
    size: usize,
    mut keep: impl FnMut(&KeyValue) -> Option<T>,
) -> Result<(Vec<T>, String), ApiError> {
    let mut start = match super::parse_page_token(token)? {
        Some(after) => {
            let mut key = after.into_bytes();
            key.push(0);
            key
        }
        None => format!("p/0000/{kind}/").into_bytes(),
    };
    let mut items = Vec::new();
    let mut examined = 0;
    loop {
        let partition: u32 = std::str::from_utf8(start.get(2..6).unwrap_or_default())
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(u32::MAX);
        if partition >= partitions {
            return Ok((items, String::new()));
        }
        let prefix = format!("p/{partition:04}/{kind}/");
        if !start.starts_with(prefix.as_bytes()) {
            start = prefix.clone().into_bytes();
        }
        let page = store.range(&start, &prefix_end(prefix.as_bytes()), 500).await?;
        for kv in &page.kvs {
            examined += 1;
            if let Some(item) = keep(kv) {
                items.push(item);
            }
            if items.len() == size || examined >= SCAN_LIMIT {
                return Ok((items, super::page_token(&String::from_utf8_lossy(&kv.key))));
            }
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                start = last.key.clone();
                start.push(0);
            }
            _ => start = format!("p/{:04}/{kind}/", partition + 1).into_bytes(),
        }
    }
}
