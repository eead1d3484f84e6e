//! Paginated listings: one page at a time, or every item as a `Stream` that fetches the next
//! page when the previous one is consumed.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryStreamExt, stream};

use crate::Error;

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Token of the next page; empty on the last page.
    pub next_page_token: String,
}

type Fetch<T> =
    Arc<dyn Fn(String, u32) -> BoxFuture<'static, Result<Page<T>, Error>> + Send + Sync>;

/// A listing to read page by page ([`page`](Self::page)) or item by item
/// ([`stream`](Self::stream)).
///
/// ```no_run
/// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
/// use futures::TryStreamExt;
/// let mut webhooks = client.webhooks().list().page_size(500).stream();
/// while let Some(webhook) = webhooks.try_next().await? {
///     println!("{} {}", webhook.id, webhook.url);
/// }
/// # Ok(()) }
/// ```
pub struct List<T> {
    fetch: Fetch<T>,
    page_size: u32,
    page_token: String,
}

impl<T> std::fmt::Debug for List<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("List")
            .field("page_size", &self.page_size)
            .field("page_token", &self.page_token)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> List<T> {
    pub(crate) fn new(
        fetch: impl Fn(String, u32) -> BoxFuture<'static, Result<Page<T>, Error>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self { fetch: Arc::new(fetch), page_size: 0, page_token: String::new() }
    }

    /// Sets how many items each page holds at most; the server's default when 0.
    pub fn page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size;
        self
    }

    /// Starts at the page of a `next_page_token` from an earlier page.
    pub fn page_token(mut self, token: impl Into<String>) -> Self {
        self.page_token = token.into();
        self
    }

    /// Returns the first page (or the page of [`page_token`](Self::page_token)).
    pub async fn page(&self) -> Result<Page<T>, Error> {
        (self.fetch)(self.page_token.clone(), self.page_size).await
    }

    /// Returns every item, page after page, as a stream; it ends after the last page and
    /// yields the error of a page that fails, then ends.
    pub fn stream(self) -> impl Stream<Item = Result<T, Error>> + Send + 'static {
        let Self { fetch, page_size, page_token } = self;
        stream::try_unfold(Some(page_token), move |token| {
            let fetch = fetch.clone();
            async move {
                let Some(token) = token else { return Ok::<_, Error>(None) };
                let page = fetch(token, page_size).await?;
                let next = (!page.next_page_token.is_empty()).then_some(page.next_page_token);
                Ok(Some((stream::iter(page.items.into_iter().map(Ok)), next)))
            }
        })
        .try_flatten()
        .boxed()
    }

    /// Returns every item of every page.
    pub async fn all(self) -> Result<Vec<T>, Error> {
        self.stream().try_collect().await
    }
}
