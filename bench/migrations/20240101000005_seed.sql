INSERT INTO accounts (email, name) VALUES ('a@example.com', 'A'), ('b@example.com', 'B');
