//! Operator accounts: the tenants of the platform.

use serde::{Deserialize, Serialize};

use super::{conflict_or, new_id, Store, StoreError};

/// What an operator may do beyond their own resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages operators as well as their own fleet.
    Admin,
    /// Manages only their own fleet.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Role {
        // Anything unknown gets the least privilege.
        if s == "admin" {
            Role::Admin
        } else {
            Role::Operator
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct OperatorRow {
    id: String,
    username: String,
    password_hash: String,
    role: String,
    created_at: i64,
    updated_at: i64,
    password_changed_at: i64,
    disabled_at: Option<i64>,
}

/// An operator account. `password_hash` is a bcrypt hash and never leaves the server.
#[derive(Clone)]
pub struct Operator {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    pub updated_at: i64,
    pub password_changed_at: i64,
    pub disabled_at: Option<i64>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("disabled_at", &self.disabled_at)
            .finish_non_exhaustive()
    }
}

impl From<OperatorRow> for Operator {
    fn from(r: OperatorRow) -> Self {
        Operator {
            id: r.id,
            username: r.username,
            password_hash: r.password_hash,
            role: Role::parse(&r.role),
            created_at: r.created_at,
            updated_at: r.updated_at,
            password_changed_at: r.password_changed_at,
            disabled_at: r.disabled_at,
        }
    }
}

pub struct NewOperator<'a> {
    pub username: &'a str,
    pub password_hash: &'a str,
    pub role: Role,
    pub now: i64,
}

const COLUMNS: &str =
    "id, username, password_hash, role, created_at, updated_at, password_changed_at, disabled_at";

impl Store {
    /// The one INSERT for operators, on the pool or inside a transaction. Returns the new id; a taken username is
    /// `StoreError::Conflict`.
    pub(crate) async fn insert_operator(
        &self,
        conn: &mut sqlx::AnyConnection,
        new: &NewOperator<'_>,
    ) -> Result<String, StoreError> {
        let id = new_id();
        sqlx::query(&self.sql(
            "INSERT INTO operators (id, username, password_hash, role, created_at, updated_at, \
             password_changed_at, disabled_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
        ))
        .bind(&id)
        .bind(new.username)
        .bind(new.password_hash)
        .bind(new.role.as_str())
        .bind(new.now)
        .bind(new.now)
        .bind(new.now)
        .execute(conn)
        .await
        .map_err(|e| conflict_or(e, "username"))?;
        Ok(id)
    }

    pub async fn count_operators(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM operators")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    pub async fn create_operator(&self, new: NewOperator<'_>) -> Result<Operator, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let id = self.insert_operator(&mut conn, &new).await?;
        Ok(Operator {
            id,
            username: new.username.to_owned(),
            password_hash: new.password_hash.to_owned(),
            role: new.role,
            created_at: new.now,
            updated_at: new.now,
            password_changed_at: new.now,
            disabled_at: None,
        })
    }

    /// Create the first operator (an admin) if and only if `token_hash` names an unexpired setup token,
    /// consuming the token in the same transaction so that two racing requests cannot both succeed.
    pub async fn create_first_operator(
        &self,
        token_hash: &str,
        new: NewOperator<'_>,
    ) -> Result<Option<Operator>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let consumed = sqlx::query(
            &self.sql("DELETE FROM setup_tokens WHERE token_hash = ? AND expires_at > ?"),
        )
        .bind(token_hash)
        .bind(new.now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if consumed != 1 {
            return Ok(None);
        }
        let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM operators")
            .fetch_one(&mut *tx)
            .await?;
        if existing > 0 {
            tx.commit().await?;
            return Ok(None);
        }
        // The first operator is always an admin.
        let id = self
            .insert_operator(
                &mut tx,
                &NewOperator {
                    role: Role::Admin,
                    ..new
                },
            )
            .await?;
        sqlx::query("DELETE FROM setup_tokens")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.operator_by_id(&id).await
    }

    pub async fn operator_by_username(
        &self,
        username: &str,
    ) -> Result<Option<Operator>, StoreError> {
        let q = format!("SELECT {COLUMNS} FROM operators WHERE username = ?");
        let row: Option<OperatorRow> = sqlx::query_as(&self.sql(&q))
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Operator::from))
    }

    pub async fn operator_by_id(&self, id: &str) -> Result<Option<Operator>, StoreError> {
        let q = format!("SELECT {COLUMNS} FROM operators WHERE id = ?");
        let row: Option<OperatorRow> = sqlx::query_as(&self.sql(&q))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Operator::from))
    }

    pub async fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        let q = format!("SELECT {COLUMNS} FROM operators ORDER BY created_at, id");
        let rows: Vec<OperatorRow> = sqlx::query_as(&q).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Operator::from).collect())
    }

    pub async fn set_operator_password(
        &self,
        id: &str,
        hash: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let q = "UPDATE operators SET password_hash = ?, password_changed_at = ?, updated_at = ? WHERE id = ?";
        let done = sqlx::query(&self.sql(q))
            .bind(hash)
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Set or clear `disabled_at`. Returns false when no such operator exists.
    pub async fn set_operator_disabled(
        &self,
        id: &str,
        disabled_at: Option<i64>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let q = "UPDATE operators SET disabled_at = ?, updated_at = ? WHERE id = ?";
        let done = sqlx::query(&self.sql(q))
            .bind(disabled_at)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Delete an operator; their sessions go with them (foreign key cascade).
    pub async fn delete_operator(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql("DELETE FROM operators WHERE id = ?"))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
