CREATE TABLE invoices (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders (id), issued timestamptz NOT NULL DEFAULT now());
CREATE INDEX invoices_order ON invoices (order_id);
