CREATE TABLE orders (id bigserial PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts (id), total_cents bigint NOT NULL);
CREATE INDEX orders_account ON orders (account_id);
