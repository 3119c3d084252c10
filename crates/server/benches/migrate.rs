//! Password migration benchmark: how long the bcrypt migration (cost 12, all cores) takes per 10,000 connections.
//!
//! Run: `cargo bench -p proxyfleet-server --bench migrate`. Imports `BENCH_MIGRATE_ROWS` (default 2000) legacy
//! connections into a fresh SQLite store (or `BENCH_DATABASE_URL`), runs the same migration `proxyfleet
//! migrate-passwords` runs, and prints rows per second and the time that rate means for 10,000 and 100,000 rows.
//! bcrypt dominates (the store's share is printed separately), so the time scales linearly with rows and inversely
//! with cores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use proxyfleet::auth::password::Hasher;
use proxyfleet::legacy::{import_connections, migrate_passwords, DEFAULT_BATCH};
use proxyfleet::store::{NewOperator, Role, Store};
use tokio_util::sync::CancellationToken;

mod support;
use support::env_num;

#[tokio::main]
async fn main() {
    let rows = env_num("BENCH_MIGRATE_ROWS", 2000);
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}/bench.db", dir.path().display()));
    let store = Store::connect(&url, 8).await.expect("store");
    store
        .create_operator(NewOperator {
            username: "benchop",
            password_hash: "x",
            role: Role::Operator,
            now: 0,
        })
        .await
        .expect("operator (use an empty database)");
    let mut csv = String::from("name,device,username,password\n");
    for i in 0..rows {
        csv.push_str(&format!("c{i},,bench{i:07},pw-{i:07}-legacy\n"));
    }
    let file = dir.path().join("export.csv");
    std::fs::write(&file, csv).unwrap();
    let t = Instant::now();
    import_connections(&store, "benchop", &file, false, 0)
        .await
        .unwrap();
    let import = t.elapsed();

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hasher = Hasher::new(cores).await.unwrap();
    let one = Instant::now();
    hasher.hash("one-reference-hash").await.unwrap();
    let single = one.elapsed();
    let t = Instant::now();
    let report = migrate_passwords(
        &store,
        &hasher,
        DEFAULT_BATCH,
        false,
        &CancellationToken::new(),
        |_, _| {},
    )
    .await
    .unwrap();
    let took = t.elapsed().as_secs_f64();
    assert_eq!(report.migrated as usize, rows);
    let rate = rows as f64 / took;
    let bcrypt_only = single.as_secs_f64() * rows as f64 / cores as f64;
    println!(
        "password migration, bcrypt cost 12, {cores} cores, store {}",
        store.backend().name()
    );
    println!(
        "  import of {rows} rows:        {:.2} s",
        import.as_secs_f64()
    );
    println!(
        "  one bcrypt hash:            {:.0} ms",
        single.as_secs_f64() * 1000.0
    );
    println!("  migrated {rows} rows in      {took:.1} s ({rate:.1} rows/s)");
    println!(
        "  of which store (estimated): {:.1} s",
        (took - bcrypt_only).max(0.0)
    );
    println!(
        "  10,000 rows at this rate:   {:.1} min",
        10_000.0 / rate / 60.0
    );
    println!(
        "  100,000 rows at this rate:  {:.1} min",
        100_000.0 / rate / 60.0
    );
}
