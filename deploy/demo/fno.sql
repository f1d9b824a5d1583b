-- Finance-and-operations-like side: customer groups, currencies,
-- customers V3 keyed by CustomerAccount, contacts.
CREATE TABLE customer_groups (
    customergroupid text PRIMARY KEY,
    description     text,
    paymenttermid   text
);
CREATE TABLE currencies (
    currencycode text PRIMARY KEY,
    name         text NOT NULL,
    symbol       text
);
CREATE TABLE customers_v3 (
    customeraccount   text PRIMARY KEY,
    organizationname  text NOT NULL,
    customergroupid   text REFERENCES customer_groups,
    salescurrencycode text REFERENCES currencies,
    creditlimit       numeric(14, 2),
    primaryphone      text,
    primaryemail      text,
    onhold            boolean NOT NULL DEFAULT false,
    modifieddatetime  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE contacts (
    contactpersonid text PRIMARY KEY,
    customeraccount text REFERENCES customers_v3 ON DELETE CASCADE,
    firstname       text,
    lastname        text,
    email           text
);
-- Deletes carry the whole old row, so every map can link them by alternate key.
ALTER TABLE customer_groups REPLICA IDENTITY FULL;
ALTER TABLE currencies REPLICA IDENTITY FULL;
ALTER TABLE customers_v3 REPLICA IDENTITY FULL;
ALTER TABLE contacts REPLICA IDENTITY FULL;

INSERT INTO customer_groups
SELECT 'G' || lpad(g::text, 2, '0'), 'Customer group ' || g, 'Net' || (g % 3 + 1) * 15
FROM generate_series(1, 10) g;

INSERT INTO currencies VALUES
    ('EUR', 'Euro', '€'), ('USD', 'US dollar', '$'), ('GBP', 'Pound sterling', '£'),
    ('DKK', 'Danish krone', 'kr'), ('JPY', 'Japanese yen', '¥');

INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode,
                          creditlimit, primaryphone, primaryemail, onhold)
SELECT 'C' || lpad(i::text, 4, '0'),
       'Customer ' || i || ' Ltd',
       'G' || lpad((i % 10 + 1)::text, 2, '0'),
       (ARRAY['EUR', 'USD', 'GBP', 'DKK', 'JPY'])[i % 5 + 1],
       (i * 1000)::numeric(14, 2),
       '+45 ' || (10000000 + i),
       'ap' || i || '@customer' || i || '.example',
       i % 17 = 0
FROM generate_series(1, 300) i;

INSERT INTO contacts
SELECT 'P' || lpad(i::text, 4, '0'), 'C' || lpad(i::text, 4, '0'), 'First' || i, 'Last' || i,
       'contact' || i || '@customer' || i || '.example'
FROM generate_series(1, 300) i;
