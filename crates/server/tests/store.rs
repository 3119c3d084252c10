//! The store on all three databases: the same tests, each on a fresh database.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Db, TestDb};
use proxyfleet::auth::{new_setup_token, setup_token_hash};
use proxyfleet::store::{
    ConnectionSettings, HourUsage, NewDevice, NewOperator, NewSession, Role, Store, StoreError,
    UsageBucket,
};

async fn open(db: Db) -> Option<(Store, TestDb)> {
    let tdb = TestDb::create(db).await?;
    let store = Store::connect(&tdb.url, 4)
        .await
        .expect("connect and migrate");
    Some((store, tdb))
}

fn op(username: &str, now: i64) -> NewOperator<'_> {
    NewOperator {
        username,
        password_hash: "$2b$12$notarealhashbutlongenoughxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        role: Role::Operator,
        now,
    }
}

async fn migrations_are_idempotent(db: Db) {
    let Some((store, tdb)) = open(db).await else {
        return;
    };
    store.close().await;
    // A second start on the same database runs no migration twice and keeps the data.
    let again = Store::connect(&tdb.url, 2).await.expect("reconnect");
    assert_eq!(again.count_operators().await.unwrap(), 0);
    assert!(again.ping(std::time::Duration::from_secs(1)).await);
}

async fn operators_round_trip(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let now = 1_795_000_000_000;
    let a = store.create_operator(op("alice", now)).await.unwrap();
    assert_eq!(store.count_operators().await.unwrap(), 1);
    let got = store
        .operator_by_username("alice")
        .await
        .unwrap()
        .expect("found");
    assert_eq!(
        (got.id.as_str(), got.role, got.created_at, got.disabled_at),
        (a.id.as_str(), Role::Operator, now, None)
    );
    assert!(
        store.operator_by_username("ALICE").await.unwrap().is_none(),
        "lookups are exact; callers lowercase"
    );

    let err = store.create_operator(op("alice", now)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict("username")), "{err:?}");

    assert!(store
        .set_operator_disabled(&a.id, Some(now + 5), now + 5)
        .await
        .unwrap());
    assert_eq!(
        store
            .operator_by_id(&a.id)
            .await
            .unwrap()
            .unwrap()
            .disabled_at,
        Some(now + 5)
    );
    assert!(store
        .set_operator_password(&a.id, "$2b$12$other", now + 6)
        .await
        .unwrap());
    assert_eq!(
        store
            .operator_by_id(&a.id)
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "$2b$12$other"
    );

    store.create_operator(op("bob", now + 1)).await.unwrap();
    let names: Vec<String> = store
        .list_operators()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.username)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(store.delete_operator(&a.id).await.unwrap());
    assert!(!store.delete_operator(&a.id).await.unwrap());
    assert!(store.operator_by_id(&a.id).await.unwrap().is_none());
}

async fn sessions_are_scoped_and_revocable(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let now = 1_795_000_000_000;
    let a = store.create_operator(op("alice", now)).await.unwrap();
    let b = store.create_operator(op("bob", now)).await.unwrap();
    for (id, jti, owner) in [
        ("s1", "j1", &a.id),
        ("s2", "j2", &a.id),
        ("s3", "j3", &b.id),
    ] {
        store
            .insert_session(NewSession {
                id,
                jti,
                operator_id: owner,
                created_at: now,
                expires_at: now + 86_400_000,
                ip: "192.0.2.1",
                user_agent: "ua",
            })
            .await
            .unwrap();
    }
    let row = store.session_by_jti("j1").await.unwrap().unwrap();
    assert_eq!(
        (row.username.as_str(), row.ip.as_str(), row.revoked_at),
        ("alice", "192.0.2.1", None)
    );
    assert_eq!(
        store
            .active_sessions(&a.id, now, now - 1)
            .await
            .unwrap()
            .len(),
        2
    );

    // Bob cannot revoke Alice's session, and learns nothing from trying.
    assert_eq!(
        store.revoke_session(&b.id, "s1", now, "x").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .revoke_session(&a.id, "s1", now, "logout")
            .await
            .unwrap()
            .as_deref(),
        Some("j1")
    );
    assert_eq!(
        store
            .revoke_session(&a.id, "s1", now, "logout")
            .await
            .unwrap(),
        None,
        "already revoked"
    );
    assert!(store
        .session_by_jti("j1")
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());

    // Activity only moves forward and hides idle sessions.
    store.touch_session("s2", now + 10).await.unwrap();
    store.touch_session("s2", now + 5).await.unwrap();
    assert_eq!(
        store
            .session_by_jti("j2")
            .await
            .unwrap()
            .unwrap()
            .last_activity_at,
        now + 10
    );
    assert_eq!(
        store
            .active_sessions(&a.id, now + 20, now + 10)
            .await
            .unwrap()
            .len(),
        0
    );

    let revoked = store
        .revoke_operator_sessions(&b.id, None, now + 30, "password_changed")
        .await
        .unwrap();
    assert_eq!(revoked, ["j3"]);
    assert!(
        store
            .session_by_jti("j2")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none(),
        "other operators untouched"
    );

    // Deleting an operator removes their sessions.
    store.delete_operator(&b.id).await.unwrap();
    assert!(store.session_by_jti("j3").await.unwrap().is_none());
    assert_eq!(store.prune_sessions(now + 86_400_001).await.unwrap(), 2);
}

async fn setup_token_creates_exactly_one_first_admin(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let now = 1_795_000_000_000;
    let (token, hash) = new_setup_token();
    store.put_setup_token(&hash, now, now + 1000).await.unwrap();
    // Wrong token, expired token: refused.
    assert!(store
        .create_first_operator(&setup_token_hash("nope"), op("eve", now))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .create_first_operator(&hash, op("eve", now + 2000))
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.count_operators().await.unwrap(), 0);
    // A fresh token replaces the old one.
    let (token2, hash2) = new_setup_token();
    store
        .put_setup_token(&hash2, now, now + 1000)
        .await
        .unwrap();
    assert!(store
        .create_first_operator(&setup_token_hash(&token), op("eve", now))
        .await
        .unwrap()
        .is_none());
    // Two racing uses: exactly one wins.
    let h2 = setup_token_hash(&token2);
    let (x, y) = tokio::join!(
        store.create_first_operator(&h2, op("first", now)),
        store.create_first_operator(&h2, op("second", now)),
    );
    let winners: Vec<_> = [x, y]
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one first operator");
    assert_eq!(winners[0].role, Role::Admin);
    assert_eq!(store.count_operators().await.unwrap(), 1);
}

fn settings(device: Option<String>, port: Option<i64>) -> ConnectionSettings {
    ConnectionSettings {
        name: "customer".into(),
        device_id: device,
        limit_bytes: Some(1 << 40),
        disabled_at: None,
        allow_cidrs: "10.0.0.0/8".into(),
        dedicated_port: port,
    }
}

async fn connections_usage_and_scoping(db: Db) {
    let Some((store, _tdb)) = open(db).await else {
        return;
    };
    let now = 1_795_000_000_000;
    let a = store.create_operator(op("alice", now)).await.unwrap();
    let b = store.create_operator(op("bob", now)).await.unwrap();
    let dev = store
        .create_device(NewDevice {
            operator_id: &a.id,
            name: "phone",
            description: "",
            pairing_code_hash: "h1",
            pairing_expires_at: now + 1,
            now,
        })
        .await
        .unwrap();
    let hash = "$2b$12$notarealhashbutlongenoughxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let c = store
        .create_connection(
            &a.id,
            "pfuser1",
            hash,
            &settings(Some(dev.id.clone()), Some(20001)),
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        (c.used_bytes, c.limit_bytes, c.dedicated_port),
        (0, Some(1 << 40), Some(20001))
    );
    // Usernames and dedicated ports are unique across operators.
    for (user, port) in [("pfuser1", None), ("pfuser2", Some(20001))] {
        let e = store
            .create_connection(&b.id, user, hash, &settings(None, port), now)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    }
    // Scoped: bob cannot read, change, reset or delete alice's.
    assert!(store.connection(&b.id, &c.id).await.unwrap().is_none());
    assert!(store.connections(&b.id).await.unwrap().is_empty());
    assert!(!store
        .update_connection(&b.id, &c.id, &settings(None, None), now)
        .await
        .unwrap());
    assert!(!store
        .set_connection_password(&b.id, &c.id, "x", now)
        .await
        .unwrap());
    assert!(!store
        .reset_connection_usage(&b.id, &c.id, now)
        .await
        .unwrap());
    assert!(!store.delete_connection(&b.id, &c.id).await.unwrap());

    // Flushes: totals are absolute, hourly buckets add up (the upsert differs per backend).
    let hour = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000;
    let bucket = |h: i64, up: i64, down: i64| UsageBucket {
        connection_id: c.id.clone(),
        device_id: dev.id.clone(),
        operator_id: a.id.clone(),
        hour: h,
        bytes_up: up,
        bytes_down: down,
    };
    store
        .flush_usage(&[(c.id.clone(), 300)], &[bucket(hour, 100, 200)])
        .await
        .unwrap();
    store
        .flush_usage(
            &[(c.id.clone(), 5_000_000_300)],
            &[
                bucket(hour, 5_000_000_000, 0),
                bucket(hour + 3_600_000, 1, 2),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .connection(&a.id, &c.id)
            .await
            .unwrap()
            .unwrap()
            .used_bytes,
        5_000_000_300
    );
    let hours = store
        .connection_usage(&a.id, &c.id, hour, hour + 7_200_000)
        .await
        .unwrap();
    assert_eq!(
        hours,
        vec![
            HourUsage {
                hour,
                bytes_up: 5_000_000_100,
                bytes_down: 200
            },
            HourUsage {
                hour: hour + 3_600_000,
                bytes_up: 1,
                bytes_down: 2
            },
        ]
    );
    assert_eq!(
        store
            .device_usage(&a.id, &dev.id, hour, hour + 3_600_000)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .device_usage(&b.id, &dev.id, hour, hour + 7_200_000)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .connection_usage(&b.id, &c.id, hour, hour + 7_200_000)
        .await
        .unwrap()
        .is_empty());

    // Reset zeroes the meter and keeps the history; deleting the device leaves the connection without one.
    assert!(store
        .reset_connection_usage(&a.id, &c.id, now)
        .await
        .unwrap());
    assert_eq!(
        store
            .connection(&a.id, &c.id)
            .await
            .unwrap()
            .unwrap()
            .used_bytes,
        0
    );
    assert!(store.delete_device(&a.id, &dev.id).await.unwrap());
    let c2 = store.connection(&a.id, &c.id).await.unwrap().unwrap();
    assert_eq!(c2.device_id, None);
    assert_eq!(
        store
            .connection_usage(&a.id, &c.id, hour, hour + 7_200_000)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(store.all_connections().await.unwrap().len(), 1);
    assert!(store.delete_connection(&a.id, &c.id).await.unwrap());
    assert!(store.all_connections().await.unwrap().is_empty());
}

on_all_databases!(
    connections_usage_and_scoping,
    migrations_are_idempotent,
    operators_round_trip,
    sessions_are_scoped_and_revocable,
    setup_token_creates_exactly_one_first_admin,
);
