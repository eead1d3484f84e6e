//! The state layer's conformance suite on each backend: the embedded store (redb) and
//! PostgreSQL.

use std::sync::Arc;

use tidings_scheduler::state::State;
use tidings_scheduler::state::postgres::PgOptions;
use tidings_scheduler::store::EmbeddedStore;
use tidings_tests::postgres::Postgres;
use tidings_tests::state_conformance as suite;

fn embedded() -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(&dir.path().join("t.redb")).expect("store");
    (dir, State::new(Arc::new(store)))
}

async fn postgres(server: &Postgres) -> State {
    let url = server.database().await.expect("database");
    State::postgres(PgOptions { url, pool_size: 8, ..Default::default() }).await.expect("state")
}

#[tokio::test]
async fn the_embedded_backend_conforms() {
    let (_dir, state) = embedded();
    suite::records_and_pages(state.clone()).await;
    suite::conditional_writes(state.clone()).await;
    suite::fenced_commits(state.clone(), false).await;
    suite::timer_ranges(state.clone(), false).await;
    suite::inbox_feed(state.clone()).await;
    suite::delivery_queries(state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_backend_conforms() {
    let server = Postgres::start().await.expect("postgres");
    suite::records_and_pages(postgres(&server).await).await;
    suite::conditional_writes(postgres(&server).await).await;
    suite::fenced_commits(postgres(&server).await, true).await;
    suite::timer_ranges(postgres(&server).await, true).await;
    suite::inbox_feed(postgres(&server).await).await;
    suite::delivery_queries(postgres(&server).await).await;
}
