//! Legacy import and the bcrypt migration, on all three databases, through the library, the real binary and a real
//! server. Bulk tests hash at bcrypt cost 4 (the logic is the same; cost 12 would take 20 minutes per 10,000 rows
//! on this machine); the binary and the server hash at the production cost 12.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Db, Opts, TestDb, TestServer};
use proxyfleet::auth::password::Hasher;
use proxyfleet::legacy::{import_connections, migrate_passwords, BadRow, ImportError};
use proxyfleet::store::{NewDevice, NewOperator, Role, Store};
use tokio_util::sync::CancellationToken;

const NOW: i64 = 1_795_000_000_000;

async fn open(db: Db) -> Option<(Store, TestDb)> {
    let tdb = TestDb::create(db).await?;
    let store = Store::connect(&tdb.url, 4).await.unwrap();
    Some((store, tdb))
}

/// An operator `legacyop` with a device named `modem-1`; returns (operator id, device id).
async fn operator_with_device(store: &Store) -> (String, String) {
    let op = store
        .create_operator(NewOperator {
            username: "legacyop",
            password_hash: "$2b$12$notarealhashbutlongenoughxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            role: Role::Operator,
            now: NOW,
        })
        .await
        .unwrap();
    let dev = store
        .create_device(NewDevice {
            operator_id: &op.id,
            name: "modem-1",
            description: "",
            pairing_code_hash: &uuid::Uuid::new_v4().simple().to_string(),
            pairing_expires_at: NOW,
            now: NOW,
        })
        .await
        .unwrap();
    (op.id, dev.id)
}

fn password_of(i: usize) -> String {
    format!("legacy-pass-{i:05}-x")
}

/// A CSV export of `n` connections (half reference the device by name, half by id).
fn write_csv(dir: &Path, n: usize, device_id: &str) -> std::path::PathBuf {
    let mut s =
        String::from("name,device,username,password,bandwidth_limit_bytes,used_bytes,enabled\n");
    for i in 0..n {
        let device = if i % 2 == 0 { "modem-1" } else { device_id };
        let limit = if i % 3 == 0 {
            String::new()
        } else {
            (1_000_000 + i).to_string()
        };
        let enabled = if i % 7 == 0 { "false" } else { "true" };
        s.push_str(&format!(
            "Customer {i},{device},user{i:05},{},{limit},{},{enabled}\n",
            password_of(i),
            i * 10
        ));
    }
    let path = dir.join("export.csv");
    std::fs::write(&path, s).unwrap();
    path
}

async fn import_and_migrate_ten_thousand(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let (_op, device) = operator_with_device(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), 10_000, &device);

    let r = import_connections(&store, "legacyop", &csv, false, NOW)
        .await
        .unwrap();
    assert_eq!(
        (r.counts.created, r.counts.already_present, r.skipped.len()),
        (10_000, 0, 0)
    );
    // Re-running the same import is harmless.
    let again = import_connections(&store, "legacyop", &csv, false, NOW)
        .await
        .unwrap();
    assert_eq!(
        (again.counts.created, again.counts.already_present),
        (0, 10_000)
    );
    assert_eq!(store.credential_counts().await.unwrap(), (10_000, 0, 0));

    // Dry run: reports, changes nothing.
    let hasher = Hasher::with_cost(2, 4).await.unwrap();
    let stop = CancellationToken::new();
    let dry = migrate_passwords(&store, &hasher, 500, true, &stop, |_, _| {})
        .await
        .unwrap();
    assert_eq!((dry.migrated, dry.failed.len()), (10_000, 0));
    assert_eq!(store.credential_counts().await.unwrap(), (10_000, 0, 0));

    let started = Instant::now();
    let mut calls = 0;
    let report = migrate_passwords(&store, &hasher, 500, false, &stop, |_, total| {
        calls += 1;
        assert_eq!(total, 10_000);
    })
    .await
    .unwrap();
    eprintln!(
        "{db:?}: 10,000 rows migrated at cost 4 in {:?}",
        started.elapsed()
    );
    assert_eq!(
        (report.migrated, report.already_hashed, report.failed.len()),
        (10_000, 0, 0)
    );
    assert_eq!(calls, 20, "one progress report per batch of 500");
    assert_eq!(
        store.credential_counts().await.unwrap(),
        (0, 10_000, 0),
        "no plaintext left"
    );

    // The hashes are of the right passwords; the other fields came through.
    let rows = store.all_connections().await.unwrap();
    let by_user: HashMap<_, _> = rows.iter().map(|r| (r.username.as_str(), r)).collect();
    for i in (0..10_000).step_by(997) {
        let r = by_user[format!("user{i:05}").as_str()];
        assert!(bcrypt::verify(password_of(i), r.password_hash.as_deref().unwrap()).unwrap());
        assert_eq!(r.device_id.as_deref(), Some(device.as_str()));
        assert_eq!(r.used_bytes, i as i64 * 10);
        assert_eq!(r.disabled_at.is_some(), i % 7 == 0);
        assert_eq!(r.limit_bytes, (i % 3 != 0).then(|| 1_000_000 + i as i64));
    }
    // A second run finds nothing to do.
    let again = migrate_passwords(&store, &hasher, 500, false, &stop, |_, _| {})
        .await
        .unwrap();
    assert_eq!((again.migrated, again.already_hashed), (0, 10_000));
}

async fn interrupted_migration_resumes_without_rehashing(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let (_op, device) = operator_with_device(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let mut csv = std::fs::read_to_string(write_csv(dir.path(), 600, &device)).unwrap();
    // One password bcrypt cannot take: reported, left as it was, the rest goes on.
    csv.push_str(&format!("Too long,,longpass,{},,,\n", "p".repeat(100)));
    let path = dir.path().join("with-long.csv");
    std::fs::write(&path, csv).unwrap();
    import_connections(&store, "legacyop", &path, false, NOW)
        .await
        .unwrap();

    let hasher = Hasher::with_cost(2, 4).await.unwrap();
    let stop = CancellationToken::new();
    let mut batches = 0;
    let first = migrate_passwords(&store, &hasher, 100, false, &stop, |_, _| {
        batches += 1;
        if batches == 2 {
            stop.cancel();
        }
    })
    .await
    .unwrap();
    assert_eq!(first.migrated, 200);
    let (plain, hashed, neither) = store.credential_counts().await.unwrap();
    assert_eq!(
        (plain, hashed, neither),
        (401, 200, 0),
        "every row has a hash or a plaintext"
    );
    let before: HashMap<String, String> = store
        .all_connections()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| Some((r.id, r.password_hash?)))
        .collect();

    let resumed = migrate_passwords(
        &store,
        &hasher,
        100,
        false,
        &CancellationToken::new(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((resumed.migrated, resumed.already_hashed), (400, 200));
    assert_eq!(resumed.failed.len(), 1);
    assert_eq!(resumed.failed[0].0, "longpass");
    assert!(
        resumed.failed[0].1.contains("at most 71"),
        "{:?}",
        resumed.failed
    );
    assert_eq!(store.credential_counts().await.unwrap(), (1, 600, 0));
    // Rows migrated in the first run were not hashed again.
    for r in store.all_connections().await.unwrap() {
        if let Some(old) = before.get(&r.id) {
            assert_eq!(r.password_hash.as_ref(), Some(old));
        }
    }
}

on_all_databases!(
    import_and_migrate_ten_thousand,
    interrupted_migration_resumes_without_rehashing
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_reported_with_their_line_and_nothing_is_half_imported() {
    let Some((store, _tdb)) = open(Db::Sqlite).await else {
        return;
    };
    let (_op, device) = operator_with_device(&store).await;
    let other = store
        .create_operator(NewOperator {
            username: "someoneelse",
            password_hash: "x",
            role: Role::Operator,
            now: NOW,
        })
        .await
        .unwrap();
    store
        .import_legacy(
            &other.id,
            &[proxyfleet::store::LegacyConnection {
                name: "theirs".into(),
                device_id: None,
                username: "taken".into(),
                password: "pw".into(),
                limit_bytes: None,
                used_bytes: 0,
                enabled: true,
            }],
            NOW,
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        format!(
            "name,device,username,password,bandwidth_limit_bytes,used_bytes,enabled\n\
             ok one,modem-1,good1,pw1,,,\n\
             bad limit,modem-1,bad2,pw,lots,,\n\
             bad device,nope,bad3,pw,,,\n\
             dup,{device},good1,pw,,,\n\
             no password,,bad5,,,,\n\
             theirs,,taken,pw,,,\n\
             bad name,,has space,pw,,,\n\
             ok two,,good2,pw2,5,,no\n"
        ),
    )
    .unwrap();
    match import_connections(&store, "legacyop", &csv, false, NOW).await {
        Err(ImportError::BadRows(rows)) => {
            let lines: Vec<usize> = rows.iter().map(|b| b.line).collect();
            assert_eq!(lines, vec![3, 4, 5, 6, 7, 8], "{rows:?}");
            let text: Vec<String> = rows.iter().map(BadRow::to_string).collect();
            assert!(
                text[0].contains("line 3") && text[0].contains("not a whole number"),
                "{text:?}"
            );
            assert!(text[1].contains("no device \"nope\""), "{text:?}");
            assert!(text[2].contains("appears twice"), "{text:?}");
            assert!(text[3].contains("password must be"), "{text:?}");
            assert!(text[4].contains("another operator"), "{text:?}");
            assert!(text[5].contains("username"), "{text:?}");
        }
        other => panic!("expected bad rows, got {other:?}"),
    }
    assert_eq!(
        store.credential_counts().await.unwrap().0,
        1,
        "nothing of this file was imported"
    );
    let r = import_connections(&store, "legacyop", &csv, true, NOW)
        .await
        .unwrap();
    assert_eq!((r.counts.created, r.skipped.len()), (2, 6));
    // JSON works the same, with entry numbers.
    let json = dir.path().join("export.json");
    std::fs::write(
        &json,
        r#"[{"name":"j","device":"modem-1","username":"json1","password":"pw","bandwidth_limit_bytes":1000,"used_bytes":5,"enabled":true},
            {"username":"json2","password":"pw","colour":"red"}]"#,
    )
    .unwrap();
    match import_connections(&store, "legacyop", &json, false, NOW).await {
        Err(ImportError::BadRows(rows)) => {
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].line, 2);
            assert!(rows[0].reason.contains("colour"), "{rows:?}");
        }
        other => panic!("expected a bad row, got {other:?}"),
    }
    assert!(matches!(
        import_connections(&store, "nobody", &json, false, NOW).await,
        Err(ImportError::NoOperator(_))
    ));
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_proxyfleet")
}

fn run_cli(args: &[&str], data_dir: &Path) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_imports_survives_a_kill_mid_migration_and_doctor_reports_zero() {
    let data = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/proxyfleet.db", data.path().display());
    let store = Store::connect(&url, 2).await.unwrap();
    let (_op, device) = operator_with_device(&store).await;
    let csv = write_csv(data.path(), 48, &device);

    let out = run_cli(
        &[
            "import",
            "connections",
            csv.to_str().unwrap(),
            "--operator",
            "legacyop",
        ],
        data.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("imported 48 connection(s); 0 already present"));
    let out = run_cli(&["doctor"], data.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("plaintext credentials: 48"));
    let out = run_cli(&["migrate-passwords", "--dry-run"], data.path());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would migrate 48"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(store.credential_counts().await.unwrap(), (48, 0, 0));

    // Killed mid-run (cost 12: about a quarter second per row and core), then run again.
    let mut child = std::process::Command::new(bin())
        .args(["migrate-passwords", "--batch-size", "4", "--data-dir"])
        .arg(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.credential_counts().await.unwrap().1 < 8 {
        assert!(Instant::now() < deadline, "migration made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (plain, hashed, neither) = store.credential_counts().await.unwrap();
    assert_eq!(
        (plain + hashed, neither),
        (48, 0),
        "each row has a hash or its plaintext"
    );
    assert!(plain > 0, "killed before the end ({hashed} hashed)");
    let out = run_cli(&["migrate-passwords"], data.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "migrated {plain}; already hashed {hashed}; failed 0"
        )),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rows/s"),
        "progress bar"
    );
    let out = run_cli(&["doctor"], data.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("plaintext credentials: 0"));
    let row = &store.all_connections().await.unwrap()[0];
    assert!(
        row.password_hash.as_deref().unwrap().starts_with("$2b$12$"),
        "production cost"
    );
    // A bad file through the binary: exit 1, line numbers on stderr, nothing imported.
    let bad = data.path().join("bad.csv");
    std::fs::write(&bad, "name,device,username,password\nx,nope,newone,pw\n").unwrap();
    let out = run_cli(
        &[
            "import",
            "connections",
            bad.to_str().unwrap(),
            "--operator",
            "legacyop",
        ],
        data.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2: no device \"nope\"") && err.contains("nothing was imported"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_authenticate_during_the_migration_and_the_server_migrates_at_start() {
    let Some(mut s) = TestServer::start(Opts::new(Db::Sqlite)).await else {
        return;
    };
    let (_op, device) = operator_with_device(s.store()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), 300, &device);
    // Imported while the server runs: its directory has never seen these usernames.
    import_connections(s.store(), "legacyop", &csv, false, NOW)
        .await
        .unwrap();

    // A batch migration (cost 4) runs while customers authenticate (every 15th user, concurrently); none fails.
    let store = s.store().clone();
    let migration = tokio::spawn(async move {
        let hasher = Hasher::with_cost(1, 4).await.unwrap();
        migrate_passwords(
            &store,
            &hasher,
            20,
            false,
            &CancellationToken::new(),
            |_, _| {},
        )
        .await
        .unwrap()
    });
    let dir_ = s.running().state.proxy.ctx.dir.clone();
    let ip = "198.51.100.7".parse().unwrap();
    let logins: Vec<_> = (0..300)
        .step_by(15)
        .map(|i| {
            let d = dir_.clone();
            tokio::spawn(async move {
                (
                    i,
                    d.authenticate(&format!("user{i:05}"), &password_of(i), ip)
                        .await,
                )
            })
        })
        .collect();
    for l in logins {
        let (i, r) = l.await.unwrap();
        assert!(r.is_ok(), "user{i:05} failed during the migration: {r:?}");
    }
    assert!(dir_.authenticate("user00001", "wrong", ip).await.is_err());
    let report = migration.await.unwrap();
    assert_eq!(report.failed.len(), 0);
    assert_eq!(s.store().credential_counts().await.unwrap(), (0, 300, 0));

    // Rows imported before a start are migrated by the server in the background, at cost 12.
    let more = dir.path().join("more.csv");
    std::fs::write(
        &more,
        "name,device,username,password\na,,late1,late-pass-1\nb,,late2,late-pass-2\n",
    )
    .unwrap();
    import_connections(s.store(), "legacyop", &more, false, NOW)
        .await
        .unwrap();
    s.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.store().credential_counts().await.unwrap().0 > 0 {
        assert!(
            Instant::now() < deadline,
            "the server did not migrate at start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = s
        .running()
        .state
        .proxy
        .ctx
        .dir
        .authenticate("late2", "late-pass-2", ip)
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}
