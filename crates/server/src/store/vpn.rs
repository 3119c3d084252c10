//! The OpenVPN door's address book: one stable host index per connection, global across operators (one OpenVPN
//! server serves them all). Rows go with their connection (`ON DELETE CASCADE`).

use super::{Store, StoreError};

impl Store {
    /// Every assigned address: `(connection_id, host_index)`.
    pub async fn vpn_addresses(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT connection_id, host_index FROM vpn_addresses")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Give `connection_id` the host index `index`. False when either is taken already (another process got there
    /// first, or the connection was deleted meanwhile): the caller reloads and tries again.
    pub async fn assign_vpn_address(
        &self,
        connection_id: &str,
        index: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            &self.sql("INSERT INTO vpn_addresses (connection_id, host_index) VALUES (?, ?)"),
        )
        .bind(connection_id)
        .bind(index)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() || e.is_foreign_key_violation() =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}
