-- Legacy plaintext passwords, only ever written by `proxyfleet import connections` and only ever read by the bcrypt
-- migration, which replaces each with its hash (and NULL here) in the same transaction.
ALTER TABLE connections ADD COLUMN password_plain VARCHAR(1024) NULL;
